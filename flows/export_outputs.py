"""export_outputs: a run, or any filtered set of outputs, to Parquet, chat JSONL and OpenAI batch files.

    python -m flows.export_outputs out/ --run RUN_ID
    python -m flows.export_outputs out/ --where "finish_reason = 'stop' AND dataset_name = 'sample'"

Without --run: the newest output per input row and model (as in `latest_outputs`).
"""

from __future__ import annotations

import argparse
from typing import Literal

from prefect import flow

from tasks import files
from tasks.config import StoreConfig
from tasks.export import ExportFile, write_chat_jsonl, write_openai_batch_files, write_parquet_export

Format = Literal["parquet", "chat_jsonl", "openai_batch"]


@flow(name="export-outputs", log_prints=True)
def export_outputs(
    out_dir: str,
    run_id: str | None = None,
    where: str | None = None,
    formats: list[Format] = ["parquet", "chat_jsonl", "openai_batch"],  # noqa: B006 (Prefect shows the default)
    store: StoreConfig = StoreConfig(),
) -> list[ExportFile]:
    name = run_id or "latest"
    exported: list[ExportFile] = []
    if "parquet" in formats:
        exported.append(write_parquet_export(store, run_id, where, files.join(out_dir, f"{name}.parquet")))
    if "chat_jsonl" in formats:
        exported.append(write_chat_jsonl(store, run_id, where, files.join(out_dir, f"{name}.chat.jsonl")))
    if "openai_batch" in formats:
        output_path = files.join(out_dir, f"{name}.batch_output.jsonl")
        error_path = files.join(out_dir, f"{name}.batch_errors.jsonl")
        exported += write_openai_batch_files(store, run_id, where, output_path, error_path)
    for item in exported:
        print(f"{item.format}: {item.lines} lines → {item.path}")
    return exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--run", dest="run_id")
    parser.add_argument("--where", help="SQL condition over the exported columns")
    parser.add_argument("--format", dest="formats", action="append", choices=["parquet", "chat_jsonl", "openai_batch"])
    parser.add_argument("--duckdb", default=StoreConfig().duckdb_path)
    args = parser.parse_args()
    export_outputs(
        args.out_dir, args.run_id, args.where, args.formats or ["parquet", "chat_jsonl", "openai_batch"],
        StoreConfig(duckdb_path=args.duckdb),
    )  # fmt: skip


if __name__ == "__main__":
    main()
