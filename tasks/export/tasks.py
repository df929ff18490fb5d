"""Export's Prefect tasks: each reads the results file read-only and writes one format atomically."""

from __future__ import annotations

from typing import Literal

from prefect import task
from pydantic import BaseModel

from tasks import storage
from tasks.config import StoreConfig
from tasks.export.formats import batch_line, chat_example, group_samples, to_json_line
from tasks.store.connection import reading
from tasks.store.exports import export_rows, write_export_parquet

Format = Literal["parquet", "chat_jsonl", "openai_batch"]
FORMATS: list[Format] = ["parquet", "chat_jsonl", "openai_batch"]


class ExportFile(BaseModel):
    format: str
    path: str
    lines: int


@task(name="write-parquet-export")
def write_parquet_export(store: StoreConfig, run_id: str | None, where: str | None, path: str) -> ExportFile:
    """Every selected row with its request, reference and lineage."""
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        lines = write_export_parquet(con, run_id, where, path)
    return ExportFile(format="parquet", path=path, lines=lines)


@task(name="write-chat-jsonl")
def write_chat_jsonl(store: StoreConfig, run_id: str | None, where: str | None, path: str) -> ExportFile:
    """Successful answers to canonical requests (a duplicate would repeat a training example)."""
    lines = 0
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con, storage.atomic_writer(path, "w") as handle:
        for row in export_rows(con, run_id, where):
            if row["error_code"] is None and row["duplicate_of"] is None:
                handle.write(to_json_line(chat_example(row)))
                lines += 1
    return ExportFile(format="chat_jsonl", path=path, lines=lines)


@task(name="write-openai-batch-files")
def write_openai_batch_files(
    store: StoreConfig, run_id: str | None, where: str | None, output_path: str, error_path: str
) -> list[ExportFile]:
    """Every input row (duplicates too, as in an OpenAI batch) to the output file or the error file."""
    counts = {"output": 0, "error": 0}
    with (
        reading(store.duckdb_path, store.lock_timeout_seconds) as con,
        storage.atomic_writer(output_path, "w") as output,
        storage.atomic_writer(error_path, "w") as errors,
    ):
        for samples in group_samples(export_rows(con, run_id, where)):
            line = batch_line(samples)
            kind = "output" if line.error is None else "error"
            (output if kind == "output" else errors).write(to_json_line(line))
            counts[kind] += 1
    return [
        ExportFile(format="openai_batch_output", path=output_path, lines=counts["output"]),
        ExportFile(format="openai_batch_errors", path=error_path, lines=counts["error"]),
    ]
