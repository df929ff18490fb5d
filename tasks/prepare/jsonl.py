"""JSON lines and OpenAI batch input: one object per line, each a row or a located rejected row."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa

from tasks.config import DatasetSpec, SpecError
from tasks.prepare.openai_batch import openai_row
from tasks.prepare.sources import (
    OPENAI_FIELDS,
    SourceBatch,
    bounded_lines,
    expectation_columns,
    filesystem,
    needed_columns,
    rejected,
)


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


# Bytes of JSON lines per batch, besides the rows per batch: memory stays bounded when rows are large.
BATCH_BYTES = 64 << 20


def iter_jsonl_batches(spec: DatasetSpec, files: list[str], fmt: str, batch_size: int) -> Iterator[SourceBatch]:
    columns, needed, raw_columns = jsonl_columns(spec, fmt), needed_columns(spec), expectation_columns(spec)
    id_kinds = IdKinds(spec.id_column if fmt != "openai_batch" else None)
    for file in files:
        fs, path, _ = filesystem(file)
        rows: list[dict] = []
        bad: list[dict] = []
        first_row = batch_bytes = 0
        with fs.open(path, "rb", compression="infer") as handle:
            line = -1
            for line, raw in enumerate(bounded_lines(handle, spec.max_line_bytes)):
                seen_rows = bool(rows) or first_row > 0
                row, problem = read_line(spec, fmt, raw, file, line, needed, raw_columns, id_kinds, seen_rows)
                if problem:
                    bad.append(problem)
                elif row:
                    rows.append({"__line": line, **row})
                batch_bytes += len(raw or b"")
                if line + 1 - first_row >= batch_size or batch_bytes >= BATCH_BYTES:
                    yield jsonl_batch(file, first_row, line + 1, rows, bad, columns, raw_columns)
                    rows, bad, first_row, batch_bytes = [], [], line + 1, 0
            if line + 1 > first_row:
                yield jsonl_batch(file, first_row, line + 1, rows, bad, columns, raw_columns)


def read_line(
    spec: DatasetSpec,
    fmt: str,
    raw: bytes | None,
    file: str,
    line: int,
    needed: list[str],
    raw_columns: list[str],
    id_kinds: IdKinds,
    seen_rows: bool,
) -> tuple[dict | None, dict | None]:
    """One line as (row, None), (None, rejected row), or (None, None) when it is blank."""
    if raw is None:
        return None, rejected(file, line, "line", f"line {line + 1}: longer than max_line_bytes ({spec.max_line_bytes} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, rejected(file, line, "line", f"line {line + 1}: invalid UTF-8 at byte {error.start}")
    if not text.strip():
        return None, None
    try:
        record = json.loads(text)
    except ValueError as error:
        return None, rejected(file, line, "line", f"line {line + 1}: not valid JSON ({error})")
    except RecursionError:
        return None, rejected(file, line, "line", f"line {line + 1}: JSON nested too deeply")
    if not isinstance(record, dict):
        return None, rejected(file, line, "line", f"line {line + 1}: not a JSON object")
    if fmt == "openai_batch":
        return openai_row(record, file, line)
    check_first_record(spec, file, line, record, seen_rows)
    row, problem = jsonl_row(spec, record, file, line, needed, raw_columns)
    problem = problem or id_kinds.check(record.get(spec.id_column) if spec.id_column else None, file, line)
    return (None, problem) if problem else (row, None)


class IdKinds:
    """Ids are text or integers, one kind per dataset: 1 and "1" would both become custom_id "1", so a
    row whose id is of the other kind than the first row's is rejected, naming both."""

    def __init__(self, id_column: str | None):
        self.id_column = id_column
        self.first: tuple[str, str, int] | None = None  # (kind, file, line) of the first id

    def check(self, raw_id: str | int | None, file: str, line: int) -> dict | None:
        if self.id_column is None or raw_id is None:
            return None
        kind = "text" if isinstance(raw_id, str) else "a number"
        if self.first is None:
            self.first = (kind, file, line)
        elif kind != self.first[0]:
            first_kind, first_file, first_line = self.first
            return rejected(
                file,
                line,
                self.id_column,
                f"line {line + 1}: id {json.dumps(raw_id)} is {kind}, but the dataset's ids are {first_kind} "
                f'(from {first_file} line {first_line + 1}): 1 and "1" would be one id',
                str(raw_id),
            )
        return None


def check_first_record(spec: DatasetSpec, file: str, line: int, record: dict, seen_rows: bool) -> None:
    """A key the spec needs that the first object lacks is a spec mistake, not a bad row."""
    if seen_rows:
        return
    optional = {*spec.override_columns, *spec.row_sampling_columns(), spec.reference_column}
    required = [c for c in needed_columns(spec) if c not in optional]
    missing = [c for c in required if c not in record]
    if missing:
        raise SpecError(
            f"dataset {spec.name}: file {file} line {line + 1} has no field '{missing[0]}' (fields: {', '.join(record)})"
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
