"""Sources: find a dataset's files, settle their format, and name the columns a spec needs.

Three formats: Parquet (a file, folder, glob or Hive-partitioned tree), JSONL (one object per
line) and OpenAI batch input (lines of custom_id/method/url/body). Every batch carries its file
and the row (or line) number of its first row, so a rejected row can always be found again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

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
    optional = [spec.id_column, spec.reference_column, *spec.override_columns, *spec.row_sampling_columns()]
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
    # HTTP paths keep their scheme: nothing to add back
    url = not fs_is_local(fs) and "://" in source and "://" not in path
    return fs, path, f"{source.split('://', 1)[0]}://" if url else ""


def format_of(spec: DatasetSpec, files: list[str]) -> str:
    """The spec's format, or the one the file names (and the first JSONL line) show."""
    if spec.format != "auto":
        return spec.format
    if not all(f.lower().endswith(JSONL_SUFFIXES) for f in files):
        return "parquet"
    fs, path, _ = filesystem(files[0])
    with fs.open(path, "rb", compression="infer") as handle:
        first = next(bounded_lines(handle, spec.max_line_bytes), None)
    try:
        record = json.loads(first or b"")
    except (ValueError, RecursionError):
        return "jsonl"  # the reader reports the bad line with its number
    return "openai_batch" if isinstance(record, dict) and {"custom_id", "url", "body"} <= record.keys() else "jsonl"


def bounded_lines(handle: IO[bytes], max_bytes: int, block_size: int = 1 << 20) -> Iterator[bytes | None]:
    """The lines of a binary file, without their newline; None for a line over max_bytes, which is
    skipped block by block and never held whole (memory stays within max_bytes + block_size)."""
    parts: list[bytes] = []  # the current line so far
    held = 0
    too_long = False
    while block := handle.read(block_size):
        pieces = block.split(b"\n")
        for piece in pieces[:-1]:  # each ends a line
            too_long = too_long or held + len(piece) > max_bytes
            yield None if too_long else b"".join([*parts, piece])
            parts, held, too_long = [], 0, False
        last = pieces[-1]
        too_long = too_long or held + len(last) > max_bytes
        parts, held = ([], 0) if too_long else ([*parts, last], held + len(last))
    if too_long or held:
        yield None if too_long else b"".join(parts)


def has_magic(path: str) -> bool:
    return any(char in path for char in "*?[")


def escape_glob(path: str) -> str:
    """A path that glob readers (DuckDB's read_parquet) take literally: [, * and ? each in a class of their own."""
    return re.sub(r"([\[*?])", r"[\1]", path)


def resolve_files(source: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """A file, a folder (the data files below it, partitions and symlinked folders included) or a glob;
    sorted so versions are stable. A name that exists is taken as it is, even with [, ], ? or * in it."""
    fs, path, prefix = filesystem(source)
    if fs.isdir(path):
        found = sorted(f for f in files_below(fs, path) if not f.rsplit("/", 1)[-1].startswith((".", "_")))
        wanted = suffixes or PARQUET_SUFFIXES
        files = [f for f in found if f.lower().endswith(wanted)]
        if not files and suffixes is None:
            files = [f for f in found if f.lower().endswith(JSONL_SUFFIXES)]
    elif fs.isfile(path):
        files = [path]
    elif has_magic(path):
        files = sorted(fs.glob(path))
    else:
        raise SpecError(f"dataset source {source}: no such file or folder")
    if not files:
        raise SpecError(f"dataset source {source}: matched no Parquet or JSONL files")
    return [prefix + f for f in files]


def files_below(fs: fsspec.AbstractFileSystem, folder: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """Every file below a folder, through symlinked folders (fsspec lists a link as a file); a link back
    to a folder already on the way is not followed again, so a cycle ends."""
    seen = seen | {os.path.realpath(folder) if fs_is_local(fs) else folder}
    files = []
    for name, info in fs.find(folder, detail=True).items():
        if info.get("islink") and fs.isdir(name):
            if os.path.realpath(name) not in seen:
                files += files_below(fs, name, seen)
        else:
            files.append(name)
    return files


def fs_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return fs.protocol in ("file", ("file", "local"), "local")


def partition_root(source: str) -> str | None:
    """The folder under which Hive partitions (key=value folders) are read; None for a file or glob."""
    fs, path, _ = filesystem(source)
    return path.rstrip("/") if fs.isdir(path) else None


# Properties a store offers that change whenever the content does (HTTP, S3, GCS, Azure spellings).
CONTENT_TAGS = ("ETag", "etag", "Content-MD5", "Digest", "md5Hash", "crc32c", "content_md5", "checksum")


def file_keys(source: str) -> dict[str, str]:
    """What tells each source file's content apart: see file_key."""
    return {file: file_key(file) for file in resolve_files(source)}


def file_key(file: str) -> str:
    """On a local disk, size, modification and change times (fsspec's ukey); elsewhere the content tag
    the store offers (ETag, MD5...) with size and Last-Modified, and where it offers none, a hash of
    the content itself (Last-Modified alone has whole seconds: an edit within one would go unseen)."""
    fs, path, _ = filesystem(file)
    if fs_is_local(fs):
        return fs.ukey(path)
    info = fs.info(path)
    offered = {key: str(info[key]) for key in (*CONTENT_TAGS, "Last-Modified", "LastModified", "size") if info.get(key)}
    if not any(key in offered for key in CONTENT_TAGS):
        offered["blake2b"] = content_digest(fs, path)
    return json.dumps(offered, sort_keys=True)


def content_digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with fs.open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def rejected(file: str, row: int, field_name: str, reason: str, custom_id: str | None = None) -> dict:
    """A rejected_rows row: where the row is, which field is at fault and why."""
    return {"source_file": redact(file), "source_row": row, "custom_id": custom_id, "field": field_name, "reason": reason}
