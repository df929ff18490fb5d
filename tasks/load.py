"""Load: find the dataset's files, check their columns against the spec, stream Arrow batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import jinja2
import jinja2.meta
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import DatasetSpec, SpecError

TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.null())
ID_TYPES_CHECK = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer)


@dataclass(frozen=True)
class SourceBatch:
    file: str
    first_row: int  # row number of the batch's first row within its file (0-based)
    batch: pa.RecordBatch


def template_columns(template: str) -> list[str]:
    """The row columns a Jinja prompt template reads."""
    try:
        parsed = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise SpecError(f"prompt_template: {error.message} (line {error.lineno})") from error
    return sorted(jinja2.meta.find_undeclared_variables(parsed))


def needed_columns(spec: DatasetSpec) -> list[str]:
    text_columns = [spec.prompt_column] if spec.prompt_column else template_columns(spec.prompt_template or "")
    reference = [spec.reference_column] if spec.reference_column else []
    return list(dict.fromkeys([spec.id_column, *text_columns, *reference]))


def resolve_files(source: str) -> list[str]:
    """A file, a folder (all Parquet files below it) or a glob; sorted so versions are stable."""
    fs, path = fsspec.core.url_to_fs(source)
    protocol = "" if fs.protocol in ("file", ("file", "local")) else f"{source.split('://', 1)[0]}://"
    if any(char in path for char in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    elif fs.isfile(path):
        files = [path]
    else:
        raise SpecError(f"dataset source {source}: no such file or folder")
    if not files:
        raise SpecError(f"dataset source {source}: matched no Parquet files")
    return [protocol + f for f in files]


def check_schema(spec: DatasetSpec, file: str, schema: pa.Schema) -> None:
    """Fail before anything is written when a column the spec needs is missing or not text."""
    for column in needed_columns(spec):
        if column not in schema.names:
            raise SpecError(
                f"dataset {spec.name}: file {file} has no column '{column}' "
                f"(columns: {', '.join(schema.names)})"
            )
    id_type = schema.field(spec.id_column).type
    if not any(check(id_type) for check in ID_TYPES_CHECK):
        raise SpecError(f"dataset {spec.name}: file {file}: id column '{spec.id_column}' is {id_type}, not text or integer")
    if spec.prompt_column and schema.field(spec.prompt_column).type not in TEXT_TYPES:
        raise SpecError(
            f"dataset {spec.name}: file {file}: prompt column '{spec.prompt_column}' "
            f"is {schema.field(spec.prompt_column).type}, not text"
        )


def open_parquet(file: str) -> pq.ParquetFile:
    fs, path = fsspec.core.url_to_fs(file)
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except (pa.ArrowInvalid, OSError) as error:
        raise SpecError(f"dataset file {file}: not a readable Parquet file ({error})") from error


def check_dataset(spec: DatasetSpec) -> list[str]:
    """Resolve the files and check every file's schema; returns the files in read order."""
    files = resolve_files(spec.source)
    for file in files:
        check_schema(spec, file, open_parquet(file).schema_arrow)
    return files


def iter_batches(spec: DatasetSpec, files: list[str], batch_size: int = 65_536) -> Iterator[SourceBatch]:
    columns = needed_columns(spec)
    for file in files:
        first_row = 0
        for batch in open_parquet(file).iter_batches(batch_size=batch_size, columns=columns):
            yield SourceBatch(file, first_row, batch)
            first_row += batch.num_rows
