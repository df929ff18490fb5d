"""export_outputs: a run, or any filtered set of outputs, to Parquet, chat JSONL and OpenAI batch files.

Without a run: the newest output per input row and model (as in `latest_outputs`).
From the command line: `vbf export OUT_DIR [--run RUN_ID] [--where COND]`.
"""

from __future__ import annotations

from prefect import flow

from tasks import storage
from tasks.config import StoreConfig
from tasks.export.tasks import FORMATS, ExportFile, Format, write_chat_jsonl, write_openai_batch_files, write_parquet_export


@flow(name="export-outputs", log_prints=True)
def export_outputs(
    out_dir: str,
    run_id: str | None = None,
    where: str | None = None,
    formats: list[Format] = FORMATS,
    store: StoreConfig = StoreConfig(),
) -> list[ExportFile]:
    name = run_id or "latest"
    exported: list[ExportFile] = []
    if "parquet" in formats:
        exported.append(write_parquet_export(store, run_id, where, storage.join(out_dir, f"{name}.parquet")))
    if "chat_jsonl" in formats:
        exported.append(write_chat_jsonl(store, run_id, where, storage.join(out_dir, f"{name}.chat.jsonl")))
    if "openai_batch" in formats:
        output_path = storage.join(out_dir, f"{name}.batch_output.jsonl")
        error_path = storage.join(out_dir, f"{name}.batch_errors.jsonl")
        exported += write_openai_batch_files(store, run_id, where, output_path, error_path)
    for item in exported:
        print(f"{item.format}: {item.lines} lines → {item.path}")
    return exported
