"""Export's Prefect tasks: one copies the selection out of the results file, the others each write one format atomically."""

from __future__ import annotations

from typing import Literal

import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel

from tasks import storage
from tasks.config import StoreConfig
from tasks.export.batch_files import selection_rows, write_batch_files
from tasks.export.formats import chat_example, to_json_line
from tasks.store.exports import write_export_selection

Format = Literal["parquet", "chat_jsonl", "openai_batch"]
FORMATS: list[Format] = ["parquet", "chat_jsonl", "openai_batch"]


class ExportFile(BaseModel):
    format: str
    path: str
    lines: int


@task(name="select-export-rows")
def select_export_rows(store: StoreConfig, run_id: str | None, where: str | None, selection: str) -> int:
    """The selected rows as a local Parquet file (`selection`); the formats are written from it, with
    the results file already closed, so runs commit while an export writes."""
    return write_export_selection(
        store.duckdb_path, store.lock_timeout_seconds, run_id, where, store.condition_timeout_seconds, selection
    )


@task(name="write-parquet-export")
def write_parquet_export(selection: str, path: str) -> ExportFile:
    """Every selected row with its request, reference and lineage."""
    with storage.atomic_path(path) as (fs, partial):
        fs.put_file(selection, partial)
    return ExportFile(format="parquet", path=path, lines=pq.ParquetFile(selection).metadata.num_rows)


@task(name="write-chat-jsonl")
def write_chat_jsonl(selection: str, path: str) -> ExportFile:
    """Successful answers to canonical requests (a duplicate would repeat a training example)."""
    lines = 0
    with storage.atomic_writer(path, "w") as handle:
        for row in selection_rows(selection):
            if row["error_code"] is None and row["duplicate_of"] is None:
                handle.write(to_json_line(chat_example(row)))
                lines += 1
    return ExportFile(format="chat_jsonl", path=path, lines=lines)


@task(name="write-openai-batch-files")
def write_openai_batch_files(selection: str, output_path: str, error_path: str) -> list[ExportFile]:
    """Every input row (duplicates too, as in an OpenAI batch) to the output file or the error file."""
    counts = write_batch_files(selection, output_path, error_path)
    return [
        ExportFile(format="openai_batch_output", path=output_path, lines=counts.output_lines),
        ExportFile(format="openai_batch_errors", path=error_path, lines=counts.error_lines),
    ]
