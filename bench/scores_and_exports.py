"""What scoring and exporting cost, side by side in one run, on a synthetic committed run.

    python bench/scores_and_exports.py --rows 20000

Prints rows/s for: reading the outputs (baseline), the default scorers, then for the exports the
Parquet copy, chat JSONL and OpenAI batch files — with and without the per-line pydantic validation
— and the ratios between them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from tasks import storage
from tasks.config import StoreConfig
from tasks.engines.base import OutputRecord, output_table
from tasks.export.formats import batch_line, chat_example, group_samples
from tasks.export.tasks import selection_rows, write_chat_jsonl, write_openai_batch_files, write_parquet_export
from tasks.scoring.registry import DEFAULT_SCORERS, resolve_scorers, score_outputs
from tasks.store.commit import CommitFiles, RunRecord, commit_run
from tasks.store.connection import open_for_write
from tasks.store.exports import write_export_selection
from tasks.store.rows import DatasetVersionRow, RunRow

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
]


def synthetic(rows: int, folder: Path) -> tuple[CommitFiles, pa.Table]:
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 40)) for i in range(rows)]
    requests = pa.table(
        {
            "custom_id": [str(i) for i in range(rows)],
            "request_key": [f"k{i}" for i in range(rows)],
            "prompt": [f"question {i}" for i in range(rows)],
            "messages": [json.dumps([{"role": "user", "content": f"question {i}"}]) for i in range(rows)],
            "source_file": ["bench.parquet"] * rows,
            "source_row": list(range(rows)),
            "duplicate_of": pa.nulls(rows, pa.string()),
            "overrides": pa.nulls(rows, pa.string()),
            "reference": [WORDS[i % len(WORDS)] for i in range(rows)],
        }
    )
    outputs = output_table(
        [
            OutputRecord(f"k{i}", text=texts[i], finish_reason="stop", prompt_tokens=12, completion_tokens=len(texts[i].split()))
            for i in range(rows)
        ]
    )
    outputs = outputs.append_column("shard_key", pa.array(["s"] * rows)).append_column("output_key", pa.array(["o"] * rows))
    paths = {name: str(folder / f"{name}.parquet") for name in ("requests", "outputs")}
    storage.write_parquet(requests, paths["requests"])
    storage.write_parquet(outputs, paths["outputs"])
    return CommitFiles([paths["requests"]], [], [paths["outputs"]], []), outputs.append_column("reference", requests["reference"])


def timed(label: str, rows: int, function, results: dict) -> None:
    started = time.perf_counter()
    function()
    seconds = time.perf_counter() - started
    results[label] = rows / seconds
    print(f"{label:<42} {rows / seconds:>12,.0f} rows/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    rows = parser.parse_args().rows
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        commit_files, outputs = synthetic(rows, folder)
        store = StoreConfig(duckdb_path=str(folder / "r.duckdb"), storage=str(folder / "storage"))
        con = open_for_write(store.duckdb_path)
        run = RunRow(
            run_id="bench",
            dataset_version="dv",
            dataset_name="bench",
            model="m",
            model_fingerprint="fp",
            engine="vllm",
            engine_args="{}",
            sampling_params="{}",
            sampling_hash="sh",
            template_hash="th",
            scorers="",
            code_version="0",
            started_at="2026-01-01T00:00:00+00:00",
            finished_at="2026-01-01T00:00:00+00:00",
            wall_seconds=1.0,
            rows_read=rows,
            rejected=0,
            requests=rows,
            unique_requests=rows,
            duplicates=0,
            shards=1,
            cached_shards=0,
            engine_requests=rows,
            outputs=rows,
            errors=0,
            prompt_tokens=0,
            completion_tokens=0,
            generated_tokens=0,
            tokens_per_second=0.0,
        )
        dataset = DatasetVersionRow(
            dataset_version="dv",
            dataset_name="bench",
            source="x",
            spec="{}",
            template_hash="th",
            rows_read=rows,
            requests=rows,
            unique_requests=rows,
            rejected=0,
        )
        commit_run(con, RunRecord(run, dataset, [], commit_files))

        results: dict[str, float] = {}
        print(f"{rows:,} outputs")
        timed("read outputs (to_pylist, baseline)", rows, lambda: outputs.to_pylist(), results)
        timed("score: default scorers", rows, lambda: score_outputs(outputs, resolve_scorers(DEFAULT_SCORERS)), results)
        timed(
            "score: default scorers without chrf",
            rows,
            lambda: score_outputs(outputs, resolve_scorers([s for s in DEFAULT_SCORERS if s != "chrf"])),
            results,
        )
        con.close()
        selection = str(folder / "selection.parquet")
        timed(
            "select rows from DuckDB to a file",
            rows,
            lambda: write_export_selection(store.duckdb_path, 60, "bench", None, 60, selection),
            results,
        )
        timed("read the selection (baseline)", rows, lambda: sum(1 for _ in selection_rows(selection)), results)
        timed(
            "chat lines, unvalidated json.dumps",
            rows,
            lambda: [
                json.dumps({"messages": json.loads(r["messages"]) + [{"role": "assistant", "content": r["text"]}]})
                for r in selection_rows(selection)
            ],
            results,
        )
        timed(
            "chat lines, pydantic-validated",
            rows,
            lambda: [chat_example(r).model_dump_json() for r in selection_rows(selection)],
            results,
        )
        timed(
            "batch lines, pydantic-validated",
            rows,
            lambda: [batch_line(s).model_dump_json() for s in group_samples(selection_rows(selection))],
            results,
        )
        out = folder / "out"
        timed("export task: parquet", rows, lambda: write_parquet_export.fn(selection, str(out / "a.parquet")), results)
        timed("export task: chat jsonl", rows, lambda: write_chat_jsonl.fn(selection, str(out / "a.jsonl")), results)
        timed(
            "export task: openai batch files",
            rows,
            lambda: write_openai_batch_files.fn(selection, str(out / "o.jsonl"), str(out / "e.jsonl")),
            results,
        )

    print()
    print(
        f"scoring / reading:                       {results['read outputs (to_pylist, baseline)'] / results['score: default scorers']:.1f}x slower"
    )
    print(
        f"chrf share of scoring time:              {1 - results['score: default scorers'] / results['score: default scorers without chrf']:.0%}"
    )
    print(
        f"pydantic validation / plain json (chat): {results['chat lines, unvalidated json.dumps'] / results['chat lines, pydantic-validated']:.2f}x slower"
    )
    print(
        f"openai batch export / parquet export:    {results['export task: parquet'] / results['export task: openai batch files']:.1f}x slower"
    )


if __name__ == "__main__":
    main()
