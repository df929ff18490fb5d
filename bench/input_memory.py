"""Peak memory of the input side (load + validate + render + dedupe + shard) at 100k and 1M rows.

    python bench/input_memory.py                       # 100k and 1M rows, exact dedupe
    python bench/input_memory.py --near-duplicates     # with MinHash near-dedupe as well

Each size runs in its own process, so each peak RSS (ru_maxrss) is that size's alone. Prints the
peaks side by side and their ratio against the 10× growth in rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(rows: int, data_dir: Path, near: bool) -> dict:
    from bench.datagen import prompts_parquet
    from tasks.config import DatasetSpec, DedupeConfig, ShardingConfig
    from tasks.prepare.requests import plan_shards, prepare_requests

    source = prompts_parquet(data_dir / f"prompts-{rows}.parquet", rows)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    dataset = DatasetSpec(
        name=f"bench-{rows}",
        source=str(source),
        id_column="id",
        prompt_column="prompt",
        system_prompt="You are terse.",
        dedupe=DedupeConfig(near_duplicates=near),
    )
    with tempfile.TemporaryDirectory() as work:
        request_set = prepare_requests(dataset, "chat", f"{work}/work", 4096)
        sharding = ShardingConfig(shard_size=2048, max_shard_tokens=200_000)
        plan = plan_shards(request_set, sharding, f"{work}/storage", None, f"{work}/work")
    return {
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "after_imports_mb": baseline,
        "unique": request_set.unique_requests,
        "rejected": request_set.rejected,
        "shards": len(plan.shards),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--data", default=str(ROOT / ".cache" / "bench"))
    parser.add_argument("--near-duplicates", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(prepare(args.child, Path(args.data), args.near_duplicates)))
        return
    results = []
    for rows in map(int, args.sizes.split(",")):
        command = [sys.executable, __file__, "--child", str(rows), "--data", args.data]
        command += ["--near-duplicates"] if args.near_duplicates else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(output))
    print(f"{'rows':>10} {'peak RSS MB':>12} {'after imports':>14} {'seconds':>8} {'unique':>9} {'shards':>7}")
    for r in results:
        print(
            f"{r['rows']:>10,} {r['peak_mb']:>12.0f} {r['after_imports_mb']:>14.0f} {r['seconds']:>8.1f} {r['unique']:>9,} {r['shards']:>7}"
        )
    if len(results) >= 2:
        small, large = results[0], results[-1]
        print(
            f"rows ×{large['rows'] / small['rows']:.0f} → peak RSS ×{large['peak_mb'] / small['peak_mb']:.2f} "
            f"(target at 1M: ≤ 1536 MB; ratio to target {large['peak_mb'] / 1536:.2f})"
        )


if __name__ == "__main__":
    main()
