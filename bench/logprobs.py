"""What storing token logprobs costs: the same run with and without top-5 token logprobs, side by side in one run.

The workload: 2,000 distinct short chat prompts, greedy, `max_tokens` 16, on the tiny model. One process,
one engine (started before anything is timed), runs alternating plain / top-5 (`--rounds` pairs), each
into a results file and storage of its own. Printed per variant: the flow's wall time and rows (outputs)
per second, its inference stage, its scoring stage (the default scorers over each finished shard,
`stage_seconds.score`) and its shard commits (`stage_seconds.commit_shards`: outputs with their token
logprobs, and scores, into DuckDB) with the rows per second of each, the results file's bytes per output
(after a checkpoint, minus the same file's size with no outputs), and the output shard files' bytes per
output; then the ratios top-5 / plain.

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/logprobs.py [--requests 2000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import ENGINE_ARGS, MODEL, build_tiny_model

WORDS = [
    "river",
    "stone",
    "cloud",
    "lamp",
    "garden",
    "paper",
    "window",
    "music",
    "winter",
    "bread",
    "forest",
    "engine",
    "letter",
    "market",
    "island",
]


def prompts(count: int) -> pa.Table:
    rows = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6)) + f" #{i}?" for i in range(count)]
    return pa.table({"id": [f"r{i}" for i in range(count)], "prompt": [f"Tell me about {row}" for row in rows]})


def folder_bytes(folder: Path, suffix: str) -> int:
    return sum(path.stat().st_size for path in folder.rglob(f"*{suffix}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-logprobs-"))
    os.environ.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    build_tiny_model()
    from flows.commands import start_prefect

    start_prefect(verbose=False)  # Prefect's batch-command defaults (a longer start-up timeout on a busy machine)

    import duckdb

    from flows.batch_inference import batch_inference
    from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, StoreConfig
    from tasks.engines.vllm import close_engine, get_engine
    from tasks.store.connection import writing

    pq.write_table(prompts(args.requests), work / "prompts.parquet")
    dataset = DatasetSpec(name="logprobs", source=str(work / "prompts.parquet"), id_column="id", prompt_column="prompt")
    model = ModelConfig(model=str(MODEL), **ENGINE_ARGS)
    get_engine(model)  # started before anything is timed
    empty = work / "empty.duckdb"
    with writing(str(empty), 60):
        pass
    empty_bytes = empty.stat().st_size
    variants = {"plain": SamplingConfig(max_tokens=16), "top-5": SamplingConfig(max_tokens=16, logprobs=5)}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for round_ in range(args.rounds):
            for name, sampling in variants.items():
                run_dir = work / f"{name}-{round_}"
                store = StoreConfig(duckdb_path=str(run_dir / "results.duckdb"), storage=str(run_dir / "storage"))
                summary = batch_inference(dataset=dataset, model=model, sampling=sampling, sharding=ShardingConfig(), store=store)
                with duckdb.connect(store.duckdb_path) as con:
                    con.execute("CHECKPOINT")
                    tokens = con.execute("SELECT sum(len(token_logprobs)) FROM outputs").fetchone()[0] or 0
                    scores_stored = con.execute("SELECT count(*) FROM scores").fetchone()[0]
                db_bytes = Path(store.duckdb_path).stat().st_size - empty_bytes
                results[name].append(
                    {
                        "wall": summary.wall_seconds,
                        "infer": summary.stage_seconds["infer"],
                        "score": summary.stage_seconds["score"],
                        "commit_shards": summary.stage_seconds["commit_shards"],
                        "outputs": summary.outputs,
                        "db_per_output": db_bytes / summary.outputs,
                        "shards_per_output": folder_bytes(run_dir / "storage" / "outputs", ".parquet") / summary.outputs,
                        "stored_tokens": tokens,
                        "scores_stored": scores_stored,
                    }
                )
                print(name, round_, results[name][-1], flush=True)
    finally:
        close_engine(timeout=0)

    mean = {name: {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]} for name, runs in results.items()}
    for m in mean.values():
        for stage in ("wall", "infer", "score", "commit_shards"):
            m[f"{stage}_rows"] = m["outputs"] / m[stage]
    print(f"\n{args.requests} requests, max_tokens 16, {args.rounds} round(s); means per variant")
    print(
        "| variant | flow wall s | flow rows/s | inference s | scoring s | scoring rows/s | score rows stored | shard commits s | "
        "commit rows/s | results-file bytes/output | shard-file bytes/output | stored tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in mean.items():
        print(
            f"| {name} | {m['wall']:.1f} | {m['wall_rows']:,.0f} | {m['infer']:.1f} | {m['score']:.2f} | {m['score_rows']:,.0f} | "
            f"{m['scores_stored']:,.0f} | {m['commit_shards']:.2f} | {m['commit_shards_rows']:,.0f} | {m['db_per_output']:,.0f} | "
            f"{m['shards_per_output']:,.0f} | {m['stored_tokens']:,.0f} |"
        )
    plain, top5 = mean["plain"], mean["top-5"]
    ratios = ", ".join(
        f"{label} {top5[f'{stage}_rows'] / plain[f'{stage}_rows']:.3f}"
        for label, stage in (("flow", "wall"), ("inference", "infer"), ("scoring", "score"), ("shard commits", "commit_shards"))
    )
    print(f"rows/s top-5 / plain: {ratios}")
    print(
        f"results-file bytes +{top5['db_per_output'] - plain['db_per_output']:,.0f} per output "
        f"(≈ {(top5['db_per_output'] - plain['db_per_output']) * 1e6 / 2**30:.2f} GiB per 1M outputs)"
    )


if __name__ == "__main__":
    main()
