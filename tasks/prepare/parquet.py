"""Parquet: find and check a dataset's files with pyarrow.dataset, read their batches with DuckDB."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from tasks.config import DatasetSpec, SpecError
from tasks.prepare.sources import SourceBatch, escape_glob, filesystem, needed_columns, partition_root


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
            pq.read_schema(handle)  # reads the footer: a file that is not Parquet fails here
    except (pa.ArrowInvalid, OSError) as error:
        raise not_parquet(file, error) from error


def physical_schema(source: ParquetSource) -> pa.Schema:
    try:
        schema = source.fragment.physical_schema
    except (pa.ArrowInvalid, OSError) as error:
        raise not_parquet(source.file, error) from error
    for name in source.partitions:
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.string()))
    return schema


def is_text(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_string_view(data_type)
        or pa.types.is_binary(data_type)
        or pa.types.is_large_binary(data_type)
        or pa.types.is_null(data_type)
    )


def check_schema(spec: DatasetSpec, file: str, schema: pa.Schema) -> None:
    """Fail before anything is written when a column the spec needs is missing or of the wrong kind."""
    for column in needed_columns(spec):
        if column not in schema.names:
            raise SpecError(f"dataset {spec.name}: file {file} has no column '{column}' (columns: {', '.join(schema.names)})")
    if spec.id_column:
        id_type = schema.field(spec.id_column).type
        if not (is_text(id_type) or pa.types.is_integer(id_type)):
            raise SpecError(f"dataset {spec.name}: file {file}: id column '{spec.id_column}' is {id_type}, not text or integer")
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


# Bytes (uncompressed, as the footer counts them) per batch, besides the rows: large rows make smaller batches.
BATCH_BYTES = 64 << 20


def rows_per_batch(source: ParquetSource, batch_size: int) -> int:
    metadata = source.fragment.metadata
    size = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    return max(1, min(batch_size, BATCH_BYTES * max(metadata.num_rows, 1) // max(size, 1)))


def iter_parquet_batches(spec: DatasetSpec, sources: list[ParquetSource], batch_size: int) -> Iterator[SourceBatch]:
    columns = needed_columns(spec)
    # DuckDB decodes Parquet (Snappy above all) in about half the CPU time Arrow takes here; one
    # thread, because the pipeline's work on the previous batch runs on the other core meanwhile.
    with duckdb.connect(config={"threads": 1}) as reader:
        fs, _, _ = filesystem(sources[0].file)
        if "://" in sources[0].file:  # URLs: DuckDB reads them through the dataset's fsspec filesystem (one per dataset)
            reader.register_filesystem(fs)
        for source in sources:
            physical = [c for c in columns if c not in source.partitions]
            first_row = 0
            try:
                names = source.fragment.physical_schema.names
                for batch in parquet_batches(reader, source.file, names, physical, rows_per_batch(source, batch_size)):
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
                raise SpecError(f"dataset file {source.file}: damaged Parquet data after row {first_row} ({error})") from error


def parquet_batches(
    reader: duckdb.DuckDBPyConnection, file: str, names: list[str], columns: list[str], batch_size: int
) -> Iterator[pa.RecordBatch]:
    """The file's columns, in file order, in batches of at most batch_size rows.

    DuckDB matches column names ignoring case and renames a clash (prompt, Prompt → prompt, Prompt_1),
    so each column is selected by DuckDB's name at its position in the file (`names`, Arrow's exact
    ones), and the path is escaped: DuckDB would take [, ? and * in a file name as a glob.
    """
    source = escape_glob(file if "://" in file else filesystem(file)[1])
    scan = "read_parquet(?, hive_partitioning = false)"  # partitions come from the dataset
    duckdb_names = [row[0] for row in reader.execute(f"DESCRIBE SELECT * FROM {scan}", [source]).fetchall()]
    if len(duckdb_names) != len(names):
        raise SpecError(f"dataset file {file}: DuckDB reads {len(duckdb_names)} columns where the footer has {len(names)}")
    at = {name: duckdb_names[position] for position, name in enumerate(names)}
    select = ", ".join('"' + at[c].replace('"', '""') + '"' for c in columns) or "NULL AS no_columns"
    for batch in reader.sql(f"SELECT {select} FROM {scan}", params=[source]).to_arrow_reader(batch_size):
        yield batch.select(list(range(len(columns)))).rename_columns(columns)
