"""export_outputs: a run, or any filtered set of outputs, to Parquet, chat JSONL and OpenAI batch files.

Without a run: the newest output per input row and model (as in `latest_outputs`).
From the command line: `vbf export OUT_DIR [--run RUN_ID] [--where COND]`.
"""

from __future__ import annotations

import tempfile

from prefect import flow

from tasks import storage
from tasks.config import StoreConfig
from tasks.export.tasks import (
    FORMATS,
    ExportFile,
    Format,
    select_export_rows,
    write_chat_jsonl,
    write_openai_batch_files,
    write_parquet_export,
)


@flow(name="export-outputs", log_prints=True)
def export_outputs(
    out_dir: str,
    run_id: str | None = None,
    where: str | None = None,
    formats: list[Format] = FORMATS,
    store: StoreConfig = StoreConfig(),
) -> list[ExportFile]:
    name = run_id or "latest"
    target = {
        suffix: storage.join(out_dir, f"{name}.{suffix}")
        for suffix in ("parquet", "chat.jsonl", "batch_output.jsonl", "batch_errors.jsonl")
    }
    exported: list[ExportFile] = []
    # One export of a name at a time (another waits here), so its files all come from one export.
    lock = storage.join(out_dir, f".{name}.lock")
    with storage.exclusive_lock(lock), tempfile.TemporaryDirectory(prefix="vbf-export-") as work:
        selection = f"{work}/selection.parquet"
        select_export_rows(store, run_id, where, selection)
        if "parquet" in formats:
            exported.append(write_parquet_export(selection, target["parquet"]))
        if "chat_jsonl" in formats:
            exported.append(write_chat_jsonl(selection, target["chat.jsonl"]))
        if "openai_batch" in formats:
            exported += write_openai_batch_files(selection, target["batch_output.jsonl"], target["batch_errors.jsonl"])
    for item in exported:
        print(f"{item.format}: {item.lines} lines → {item.path}")
    return exported
