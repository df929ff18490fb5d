"""Sources: find a dataset's files, settle their format, and name the columns a spec needs.

Three formats: Parquet (a file, folder, glob or Hive-partitioned tree), JSONL (one object per
line) and OpenAI batch input (lines of custom_id/method/url/body). Every batch carries its file
and the row (or line) number of its first row, so a rejected row can always be found again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import fsspec
import jinja2
import jinja2.meta
import pyarrow as pa

from tasks.config import DatasetSpec, SpecError
from tasks.redact import redact

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


def filesystem(source: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(filesystem, path on it, prefix that turns a path back into a URL)."""
    fs, path = fsspec.core.url_to_fs(source)
    local = fs.protocol in ("file", ("file", "local"), "local")
    # HTTP(S) paths keep their scheme; other filesystems (s3, gcs, ...) drop it
    keeps_scheme = "://" in path
    return fs, path, "" if local or keeps_scheme or "://" not in source else f"{source.split('://', 1)[0]}://"


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


def file_keys(source: str) -> dict[str, str]:
    """Each source file's properties (fsspec's ukey: size and mtime on a local disk, the ETag on an object store)."""
    keys = {}
    for file in resolve_files(source):
        fs, path, _ = filesystem(file)
        keys[file] = fs.ukey(path)
    return keys


def rejected(file: str, row: int, field_name: str, reason: str, custom_id: str | None = None) -> dict:
    """A rejected_rows row: where the row is, which field is at fault and why."""
    return {"source_file": redact(file), "source_row": row, "custom_id": custom_id, "field": field_name, "reason": reason}
