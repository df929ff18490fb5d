"""A big job end to end: N short chat prompts (8 words, 5% exact duplicates, 2 output tokens) through
`vbf run`, side by side with bare `vllm.LLM.generate` over the same rows, both as whole processes.

Prints per size: whole wall time and rows/s of each; the pipeline's own time outside the engine per
request ((flow wall - engine seconds) / requests); the orchestrator's peak RSS (the `vbf` process,
sampled every 0.5 s; the engine's processes are vLLM's own); how long until the first output can be
queried in DuckDB; the DuckDB file's size; how many Prefect task runs the run made. With several
sizes, the peak RSS of the largest against the smallest (target: within 1.2x).

    .venv/bin/python bench/scale.py --rows 100000 --rows 1000000

Short prompts keep the engine's share small, so the pipeline's own costs show; they still pass
every stage (validation, dedupe, sharding, the journal, per-shard scoring and commits).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import ENGINE_ARGS, MODEL, build_tiny_model, prefect_env, run_bare, vbf_run
from bench.datagen import VOCABULARY

MAX_TOKENS = 2

BARE = textwrap.dedent(
    """
    import json, sys, time
    import pyarrow.parquet as pq

    if __name__ == "__main__":
        started = time.perf_counter()
        from vllm import LLM, SamplingParams
        out, data, engine_args, model = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
        llm = LLM(model=model, **engine_args)
        loaded = time.perf_counter()
        conversations = [[{"role": "user", "content": p}] for p in pq.read_table(data)["prompt"].to_pylist()]
        outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=int(sys.argv[5]), seed=0), use_tqdm=False)
        done = time.perf_counter()
        json.dump({"engine_start": loaded - started, "generate": done - loaded, "rows": len(outputs)}, open(out, "w"))
    """
)


def short_prompts(path: Path, rows: int, duplicate_share: float = 0.05, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = VOCABULARY[rng.integers(0, len(VOCABULARY), size=(rows, 8))]
    texts = np.array([" ".join(row) for row in words], dtype=object)
    copies = np.flatnonzero(rng.random(rows) < duplicate_share)
    texts[copies] = texts[rng.integers(0, rows, len(copies))]  # exact copies: what the engine would see is the same
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": texts.tolist()}), path, row_group_size=100_000)
    return path


def first_output_seen(duckdb_path: Path) -> bool:
    try:
        with duckdb.connect(str(duckdb_path), read_only=True) as con:
            return con.execute("SELECT count(*) FROM outputs").fetchone()[0] > 0
    except (duckdb.IOException, duckdb.CatalogException):  # not there yet, or a commit holds it
        return False


def run_pipeline(folder: Path, data: Path, env: dict, shard_size: int) -> dict:
    command = [
        *vbf_run([str(data), "--prompt-column", "prompt", "--id-column", "id"], folder, MAX_TOKENS),
        "--shard-size",
        str(shard_size),
        "--summary-json",
        str(folder / "summary.json"),
    ]
    started = time.perf_counter()
    with open(folder / "vbf.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    watched, peak_rss, first_output = psutil.Process(process.pid), 0, None
    while process.poll() is None:
        try:
            peak_rss = max(peak_rss, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if first_output is None and first_output_seen(folder / "results.duckdb"):
            first_output = time.perf_counter() - started
        time.sleep(0.5)
    wall = time.perf_counter() - started
    if process.wait() != 0:
        raise SystemExit(f"vbf run failed: see {folder / 'vbf.log'}")
    summary = json.loads((folder / "summary.json").read_text())
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as con:
        task_runs = con.execute("SELECT count(*) FROM task_run").fetchone()[0]
    return {
        "wall": wall,
        "peak_rss": peak_rss,
        "first_output": first_output,
        "summary": summary,
        "task_runs": task_runs,
        "duckdb_bytes": (folder / "results.duckdb").stat().st_size,
    }


def one_size(root: Path, rows: int, shard_size: int) -> dict:
    folder = root / f"rows-{rows}"
    folder.mkdir()
    data = short_prompts(folder / "prompts.parquet", rows)
    env = prefect_env(folder)
    bare = run_bare(BARE, folder, "bare", [str(data), json.dumps(ENGINE_ARGS), str(MODEL), str(MAX_TOKENS)], env)
    pipeline = run_pipeline(folder, data, env, shard_size)
    s = pipeline["summary"]
    engine_seconds = s["stage_seconds"]["generate"]
    print(
        f"{rows} rows ({s['unique_requests']} unique, {s['shards']} shards of at most {shard_size}, {MAX_TOKENS} output tokens each)",
        flush=True,
    )
    print(
        f"  bare LLM.chat        {bare['wall']:8.1f} s  {rows / bare['wall']:7.1f} rows/s  (engine start {bare['engine_start']:.1f} s)"
    )
    print(
        f"  pipeline (vbf run)   {pipeline['wall']:8.1f} s  {rows / pipeline['wall']:7.1f} rows/s  (stages {s['stage_seconds']})"
    )
    print(f"  throughput pipeline / bare, whole process: {bare['wall'] / pipeline['wall']:.3f}  (target >= 0.95)")
    outside = (s["wall_seconds"] - engine_seconds) / max(s["unique_requests"], 1) * 1e6
    print(f"  pipeline's own time outside the engine: {outside:.0f} us per request")
    print(
        f"  orchestrator peak RSS {pipeline['peak_rss'] / 2**30:.2f} GiB; first output queryable after {pipeline['first_output']:.1f} s"
    )
    print(f"  DuckDB file {pipeline['duckdb_bytes'] / 2**20:.1f} MiB; Prefect task runs {pipeline['task_runs']}", flush=True)
    return pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, action="append", help="dataset sizes (repeatable; default 100000)")
    parser.add_argument("--shard-size", type=int, default=1024, help="the pipeline's shard size (vbf run --shard-size)")
    args = parser.parse_args()
    sizes = sorted(args.rows or [100_000])
    build_tiny_model()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        results = [one_size(Path(tmp), rows, args.shard_size) for rows in sizes]
    if len(results) > 1:
        ratio = results[-1]["peak_rss"] / results[0]["peak_rss"]
        print(f"peak RSS {sizes[-1]} rows / {sizes[0]} rows: {ratio:.2f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
