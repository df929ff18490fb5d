"""Dispatch: the same dataset through the local cluster with dispatch="local" and dispatch="workers".

    .venv/bin/python bench/bench_dispatch.py [--rows 2400] [--shard-size 256] [--workers 2] [--max-tokens 16]

Brings up the local cluster of `vbf cluster` (tasks/cluster.py: server, pools, two gpu workers), runs `batch-inference/sample`
once per mode on fresh result stores, and prints each run's wall time (deployment run to Completed,
engine start included), the flow's own wall seconds from DuckDB, and the ratio workers / local.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.cluster import LocalCluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2400)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-dispatch-"))
    data = tmp / "data.parquet"
    pq.write_table(pq.read_table(REPO / "datasets" / "sample" / "prompts.parquet").slice(0, args.rows), data)
    dataset = {"name": "bench", "source": str(data), "id_column": "id", "prompt_column": "prompt"}
    rows = {}
    with LocalCluster(tmp / "prefect", results=tmp / "results", gpu_workers=args.workers, cpu_workers=0) as cluster:
        for mode in ("local", "workers"):
            store = {"duckdb_path": str(tmp / f"{mode}.duckdb"), "storage": str(tmp / f"{mode}-storage")}
            params = {
                "dataset": dataset,
                "store": store,
                "dispatch": mode,
                "n_workers": args.workers,
                "sampling": {"max_tokens": args.max_tokens},
                "sharding": {"shard_size": args.shard_size, "gpu_limit": "gpu"},
            }
            started = time.perf_counter()
            run = cluster.run_deployment("batch-inference/sample", params)
            seconds = time.perf_counter() - started
            if not run.state.is_completed():
                sys.exit(f"{mode} run ended {run.state.name}; logs in {cluster.home / 'logs'}")
            with duckdb.connect(store["duckdb_path"], read_only=True) as con:
                flow_seconds, shards, outputs, tokens = con.execute(
                    "SELECT wall_seconds, shards, outputs, generated_tokens FROM runs"
                ).fetchone()
            rows[mode] = (seconds, flow_seconds, shards, outputs, tokens)
    print(f"{args.rows} rows, shard_size {args.shard_size}, {args.workers} worker groups, max_tokens {args.max_tokens}")
    print(f"{'dispatch':<10}{'run s':>8}{'flow s':>8}{'shards':>8}{'outputs':>9}{'tokens':>8}")
    for mode, (seconds, flow_seconds, shards, outputs, tokens) in rows.items():
        print(f"{mode:<10}{seconds:>8.1f}{flow_seconds:>8.1f}{shards:>8}{outputs:>9}{tokens:>8}")
    print(f"workers / local wall time: {rows['workers'][0] / rows['local'][0]:.2f}x")


if __name__ == "__main__":
    main()
