"""Load: find the dataset's files, check them against the spec, stream Arrow batches.

Three formats: Parquet (a file, folder, glob or Hive-partitioned tree), JSONL (one object per
line) and OpenAI batch input (lines of custom_id/method/url/body). Every batch carries its file
and the row (or line) number of its first row, so a rejected row can always be found again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb
import fsspec
import jinja2
import jinja2.meta
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from tasks.config import DatasetSpec, SpecError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
OPENAI_URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
# Columns of an OpenAI batch line once mapped onto a request (see openai_row).
OPENAI_FIELDS = {"id": "custom_id", "prompt": "prompt", "messages": "messages", "overrides": "overrides"}

REJECTED_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("custom_id", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class SourceBatch:
    file: str
    first_row: int  # row number of the batch's first row within its file (0-based; JSONL: line - 1)
    batch: pa.RecordBatch
    # Rows the reader itself could not use (a line that is not JSON, say); already located.
    rejected: list[dict] = field(default_factory=list)
    rows: int | None = None  # rows (lines) this batch stands for, rejected ones included

    @property
    def rows_read(self) -> int:
        return self.batch.num_rows if self.rows is None else self.rows


def template_columns(template: str) -> list[str]:
    """The row columns a Jinja prompt template reads."""
    try:
        parsed = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise SpecError(f"prompt_template: {error.message} (line {error.lineno})") from error
    return sorted(jinja2.meta.find_undeclared_variables(parsed))


def needed_columns(spec: DatasetSpec) -> list[str]:
    return [*request_columns(spec), *expectation_columns(spec)]


def request_columns(spec: DatasetSpec) -> list[str]:
    """The columns that make up the requests."""
    if spec.format == "openai_batch":
        return list(OPENAI_FIELDS.values())
    text_columns = [spec.prompt_column] if spec.prompt_column else template_columns(spec.prompt_template or "")
    if spec.messages_column:
        text_columns = [spec.messages_column]
    optional = [spec.id_column, spec.reference_column, *spec.override_columns]
    return list(dict.fromkeys([*(c for c in optional if c), *text_columns]))


def validated_columns(spec: DatasetSpec) -> list[str]:
    """The dataset's own columns the spec's expectations name: they go to the validator beside the requests."""
    if spec.format == "openai_batch":
        return []  # its lines hold requests only: expectations name request columns
    return spec.validation.source_columns()


def expectation_columns(spec: DatasetSpec) -> list[str]:
    """Those of them the requests do not need: read for validation only, in their own types."""
    requests = request_columns(spec)
    return [c for c in validated_columns(spec) if c not in requests]


# ---------------------------------------------------------------- files and formats


def filesystem(source: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(filesystem, path on it, prefix that turns a path back into a URL)."""
    fs, path = fsspec.core.url_to_fs(source)
    local = fs.protocol in ("file", ("file", "local"), "local")
    return fs, path, "" if local or "://" not in source else f"{source.split('://', 1)[0]}://"


def format_of(spec: DatasetSpec, files: list[str]) -> str:
    """The spec's format, or the one the file names (and the first JSONL line) show."""
    if spec.format != "auto":
        return spec.format
    if not all(f.lower().endswith(JSONL_SUFFIXES) for f in files):
        return "parquet"
    fs, path, _ = filesystem(files[0])
    with fs.open(path, "rb", compression="infer") as handle:
        first = handle.readline()
    try:
        record = json.loads(first)
    except ValueError:
        return "jsonl"  # the reader reports the bad line with its number
    return "openai_batch" if isinstance(record, dict) and {"custom_id", "url", "body"} <= record.keys() else "jsonl"


def resolve_files(source: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """A file, a folder (the data files below it, partitions included) or a glob; sorted so versions are stable."""
    fs, path, prefix = filesystem(source)
    if any(char in path for char in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        found = sorted(f for f in fs.find(path) if not f.rsplit("/", 1)[-1].startswith((".", "_")))
        wanted = suffixes or PARQUET_SUFFIXES
        files = [f for f in found if f.lower().endswith(wanted)]
        if not files and suffixes is None:
            files = [f for f in found if f.lower().endswith(JSONL_SUFFIXES)]
    elif fs.isfile(path):
        files = [path]
    else:
        raise SpecError(f"dataset source {source}: no such file or folder")
    if not files:
        raise SpecError(f"dataset source {source}: matched no Parquet or JSONL files")
    return [prefix + f for f in files]


def partition_root(source: str) -> str | None:
    """The folder under which Hive partitions (key=value folders) are read; None for a file or glob."""
    fs, path, _ = filesystem(source)
    return path.rstrip("/") if not any(c in path for c in "*?[") and fs.isdir(path) else None


# ---------------------------------------------------------------- Parquet


@dataclass(frozen=True)
class ParquetSource:
    file: str
    fragment: ds.ParquetFileFragment
    partitions: dict[str, str]  # Hive partition columns of this file


def open_parquet(spec: DatasetSpec, files: list[str]) -> list[ParquetSource]:
    fs, _, _ = filesystem(files[0])
    paths = [filesystem(f)[1] for f in files]
    root = partition_root(spec.source)
    try:
        dataset = ds.dataset(
            paths,
            filesystem=PyFileSystem(FSSpecHandler(fs)),
            format="parquet",
            partitioning="hive" if root else None,
            partition_base_dir=root,
            exclude_invalid_files=False,
        )
    except (pa.ArrowInvalid, OSError) as error:
        for file, path in zip(files, paths):  # name the file at fault
            check_parquet_file(file, fs, path)
        raise SpecError(f"dataset {spec.name}: {error}") from error
    sources = []
    for file, fragment in zip(files, dataset.get_fragments()):
        keys = ds.get_partition_keys(fragment.partition_expression) or {}
        sources.append(ParquetSource(file, fragment, {k: str(v) for k, v in keys.items()}))
    return sources


def not_parquet(file: str, error: Exception) -> SpecError:
    message = str(error)
    empty = "0 bytes" in message or "size is 0" in message or "empty" in message.lower()
    return SpecError(f"dataset file {file}: not a readable Parquet file ({'the file is empty' if empty else message})")


def check_parquet_file(file: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        with fs.open(path, "rb") as handle:
            pq.ParquetFile(handle).schema_arrow
    except (pa.ArrowInvalid, OSError) as error:
        raise not_parquet(file, error) from error


def physical_schema(source: ParquetSource) -> pa.Schema:
    try:
        schema = source.fragment.physical_schema
    except (pa.ArrowInvalid, OSError) as error:
        raise not_parquet(source.file, error) from error
    for name, value in source.partitions.items():
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.string()))
    return schema


def is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_string_view(data_type) \
        or pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type) or pa.types.is_null(data_type)


def check_schema(spec: DatasetSpec, file: str, schema: pa.Schema) -> None:
    """Fail before anything is written when a column the spec needs is missing or of the wrong kind."""
    for column in needed_columns(spec):
        if column not in schema.names:
            raise SpecError(
                f"dataset {spec.name}: file {file} has no column '{column}' "
                f"(columns: {', '.join(schema.names)})"
            )
    if spec.id_column:
        id_type = schema.field(spec.id_column).type
        if not (is_text(id_type) or pa.types.is_integer(id_type)):
            raise SpecError(
                f"dataset {spec.name}: file {file}: id column '{spec.id_column}' is {id_type}, not text or integer"
            )
    for role, column in (("prompt", spec.prompt_column), ("reference", spec.reference_column)):
        if column and not is_text(schema.field(column).type):
            raise SpecError(
                f"dataset {spec.name}: file {file}: {role} column '{column}' is {schema.field(column).type}, not text"
            )
    if spec.messages_column:
        messages_type = schema.field(spec.messages_column).type
        if not (is_text(messages_type) or pa.types.is_list(messages_type) or pa.types.is_large_list(messages_type)):
            raise SpecError(
                f"dataset {spec.name}: file {file}: messages column '{spec.messages_column}' is {messages_type}, "
                "not a list of {role, content} or JSON text"
            )


def iter_parquet_batches(spec: DatasetSpec, sources: list[ParquetSource], batch_size: int) -> Iterator[SourceBatch]:
    columns = needed_columns(spec)
    # DuckDB decodes Parquet (Snappy above all) in about half the CPU time Arrow takes here; one
    # thread, because the pipeline's work on the previous batch runs on the other core meanwhile.
    with duckdb.connect(config={"threads": 1}) as reader:
        fs, _, prefix = filesystem(sources[0].file)
        if prefix:  # URLs: DuckDB reads them through the dataset's fsspec filesystem (one per dataset)
            reader.register_filesystem(fs)
        for source in sources:
            physical = [c for c in columns if c not in source.partitions]
            first_row = 0
            try:
                for batch in parquet_batches(reader, source.file, physical, batch_size):
                    for name in columns:
                        if name in source.partitions:
                            batch = batch.append_column(name, pa.array([source.partitions[name]] * batch.num_rows))
                    yield SourceBatch(source.file, first_row, batch.select(columns))
                    first_row += batch.num_rows
            except (duckdb.Error, pa.ArrowInvalid, OSError) as error:
                if "Invalid string encoding" in str(error):
                    raise SpecError(
                        f"dataset file {source.file}: a text column holds invalid UTF-8 after row {first_row} ({error}); "
                        "store that column as binary to have such rows rejected one by one"
                    ) from error
                raise SpecError(
                    f"dataset file {source.file}: damaged Parquet data after row {first_row} ({error})"
                ) from error


def parquet_batches(reader: duckdb.DuckDBPyConnection, file: str, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    """The file's columns, in file order, in batches of at most batch_size rows."""
    _, path, prefix = filesystem(file)
    select = ", ".join('"' + c.replace('"', '""') + '"' for c in columns) or "NULL AS no_columns"
    query = f"SELECT {select} FROM read_parquet(?, hive_partitioning = false)"  # partitions come from the dataset
    for batch in reader.sql(query, params=[file if prefix else path]).to_arrow_reader(batch_size):
        yield batch.select(columns)


# ---------------------------------------------------------------- JSONL and OpenAI batch input


def rejected(file: str, line: int, field_name: str, reason: str, custom_id: str | None = None) -> dict:
    return {"source_file": file, "source_row": line, "custom_id": custom_id, "field": field_name, "reason": reason}


def openai_row(record: dict, file: str, line: int) -> tuple[dict | None, dict | None]:
    """An OpenAI batch line as (row, None) or (None, rejected row)."""
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        return None, rejected(file, line, "custom_id", f"line {line + 1}: custom_id missing or not text")
    url = record.get("url")
    if url not in OPENAI_URLS:
        return None, rejected(
            file, line, "url",
            f"line {line + 1}: url {url!r} is not supported (only {', '.join(OPENAI_URLS)})", custom_id,
        )  # fmt: skip
    body = record.get("body")
    if not isinstance(body, dict):
        return None, rejected(file, line, "body", f"line {line + 1}: body missing or not an object", custom_id)
    text_field = OPENAI_URLS[url]
    text = body.get(text_field)
    if text_field == "prompt" and not (text is None or isinstance(text, str)):
        return None, rejected(file, line, "body.prompt", f"line {line + 1}: prompt must be one string", custom_id)
    overrides = {k: v for k, v in body.items() if k not in ("model", "messages", "prompt")}
    return {
        "custom_id": custom_id,
        "prompt": text if text_field == "prompt" else None,
        "messages": json.dumps(text, ensure_ascii=False) if text_field == "messages" and text is not None else None,
        "overrides": json.dumps(overrides, ensure_ascii=False, sort_keys=True) if overrides else None,
    }, None


def jsonl_value(value: object) -> object:
    """Template columns take any JSON value; non-text goes on as JSON so one column keeps one type."""
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def json_type(value: object) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def jsonl_row(
    spec: DatasetSpec, record: dict, file: str, line: int, columns: list[str], raw_columns: list[str]
) -> tuple[dict | None, dict | None]:
    """A JSONL object as (row, None) or (None, rejected row); text fields must hold text.

    `columns` are the spec's needed columns; `raw_columns` (read for expectations only) keep their JSON values.
    """
    raw_id = record.get(spec.id_column) if spec.id_column else None
    if isinstance(raw_id, bool) or not (raw_id is None or isinstance(raw_id, str | int)):
        return None, rejected(file, line, spec.id_column, f"line {line + 1}: id is {json_type(raw_id)}, not text or integer")
    custom_id = None if raw_id is None else str(raw_id)
    row: dict = {}
    for column in columns:
        value = record.get(column)
        if column == spec.id_column:
            row[column] = custom_id
        elif column in (spec.prompt_column, spec.reference_column) and value is not None and not isinstance(value, str):
            reason = f"line {line + 1}: expected text, got {json_type(value)}"
            return None, rejected(file, line, column, reason, custom_id)
        elif column == spec.messages_column:
            row[column] = None if value is None else json.dumps(value, ensure_ascii=False)
        elif column in raw_columns:
            row[column] = value
        elif column not in spec.override_columns:
            row[column] = jsonl_value(value)
    overrides = {c: record[c] for c in spec.override_columns if record.get(c) is not None}
    row["overrides"] = json.dumps(overrides, ensure_ascii=False, sort_keys=True) if overrides else None
    return row, None


def jsonl_columns(spec: DatasetSpec, fmt: str) -> list[str]:
    """The columns of a JSONL batch: per-row overrides travel as one JSON column, as in OpenAI batch input."""
    if fmt == "openai_batch":
        return list(OPENAI_FIELDS.values())
    return [c for c in needed_columns(spec) if c not in spec.override_columns] + ["overrides"]


def iter_jsonl_batches(spec: DatasetSpec, files: list[str], fmt: str, batch_size: int) -> Iterator[SourceBatch]:
    columns, needed, raw_columns = jsonl_columns(spec, fmt), needed_columns(spec), expectation_columns(spec)
    for file in files:
        fs, path, _ = filesystem(file)
        rows: list[dict] = []
        bad: list[dict] = []
        first_row = 0
        with fs.open(path, "rb", compression="infer") as handle:
            line = -1
            for line, raw in enumerate(handle):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad.append(rejected(file, line, "line", f"line {line + 1}: invalid UTF-8 at byte {error.start}"))
                    text = None
                if text is not None and text.strip():
                    try:
                        record = json.loads(text)
                    except ValueError as error:
                        bad.append(rejected(file, line, "line", f"line {line + 1}: not valid JSON ({error})"))
                        record = None
                    if record is not None and not isinstance(record, dict):
                        bad.append(rejected(file, line, "line", f"line {line + 1}: not a JSON object"))
                    elif record is not None:
                        if fmt == "openai_batch":
                            row, problem = openai_row(record, file, line)
                        else:
                            check_first_record(spec, file, line, record, seen_rows=bool(rows) or first_row > 0)
                            row, problem = jsonl_row(spec, record, file, line, needed, raw_columns)
                        if problem:
                            bad.append(problem)
                        else:
                            rows.append({"__line": line, **row})
                if line + 1 - first_row >= batch_size:
                    yield jsonl_batch(file, first_row, line + 1, rows, bad, columns, raw_columns)
                    rows, bad, first_row = [], [], line + 1
            if line + 1 > first_row:
                yield jsonl_batch(file, first_row, line + 1, rows, bad, columns, raw_columns)


def check_first_record(spec: DatasetSpec, file: str, line: int, record: dict, seen_rows: bool) -> None:
    """A key the spec needs that the first object lacks is a spec mistake, not a bad row."""
    if seen_rows:
        return
    required = [c for c in needed_columns(spec) if c not in spec.override_columns and c != spec.reference_column]
    missing = [c for c in required if c not in record]
    if missing:
        raise SpecError(
            f"dataset {spec.name}: file {file} line {line + 1} has no field '{missing[0]}' "
            f"(fields: {', '.join(record)})"
        )


def jsonl_batch(
    file: str, first_row: int, end: int, rows: list[dict], bad: list[dict], columns: list[str], raw_columns: list[str]
) -> SourceBatch:
    """Request columns as text; the expectations' own columns keep their JSON type (JSON text when it varies)."""
    schema = pa.schema([("__line", pa.int64()), *((c, pa.string()) for c in columns if c not in raw_columns)])
    batch = pa.RecordBatch.from_pylist(rows, schema=schema)
    for column in raw_columns:
        values = [row.get(column) for row in rows]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            array = pa.array([jsonl_value(value) for value in values], pa.string())
        batch = batch.append_column(column, array)
    return SourceBatch(file, first_row, batch, bad, rows=end - first_row)


# ---------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class Dataset:
    spec: DatasetSpec  # with the format resolved
    files: list[str]
    parquet: list[ParquetSource]

    def row_count(self) -> int | None:
        """From the Parquet footers (already read for the schema check); None for JSON lines."""
        return sum(source.fragment.metadata.num_rows for source in self.parquet) if self.parquet else None


def check_dataset(spec: DatasetSpec) -> Dataset:
    """Resolve the files, settle the format and check every Parquet file's schema; nothing is read yet."""
    files = resolve_files(spec.source)
    spec = spec.model_copy(update={"format": format_of(spec, files)})
    if spec.format == "openai_batch" and spec.id_column not in (None, "custom_id"):
        raise SpecError(f"dataset {spec.name}: OpenAI batch input has its ids in custom_id; leave id_column unset")
    if spec.format != "openai_batch" and not (spec.prompt_column or spec.prompt_template or spec.messages_column):
        raise SpecError(
            f"dataset {spec.name}: {files[0]} is {spec.format}, not OpenAI batch input: "
            "set one of prompt_column, prompt_template or messages_column"
        )
    if spec.format != "parquet":
        return Dataset(spec, files, [])
    sources = open_parquet(spec, files)
    for source in sources:
        check_schema(spec, source.file, physical_schema(source))
    return Dataset(spec, files, sources)


def iter_batches(dataset: Dataset, batch_size: int = 65_536) -> Iterator[SourceBatch]:
    if dataset.spec.format == "parquet":
        yield from iter_parquet_batches(dataset.spec, dataset.parquet, batch_size)
    else:
        yield from iter_jsonl_batches(dataset.spec, dataset.files, dataset.spec.format, batch_size)


def prefetch(batches: Iterator[SourceBatch], depth: int = 2) -> Iterator[SourceBatch]:
    """Read ahead in a thread: Arrow decodes without the GIL, so reading overlaps the Python work on the previous batch."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                ready.put(batch)
        except BaseException as error:  # handed to the consumer, raised there
            ready.put(error)
        ready.put(done)

    threading.Thread(target=produce, daemon=True, name="prefetch-batches").start()
    while (item := ready.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
