"""A run's metrics on vs off: the same shards through the same engine, alternated in one process.

    PYTHONPATH=. .venv/bin/python bench/metrics_overhead.py [--pairs 3] [--shards 4] [--shard-size 512]

"on" serves the run's metrics (tasks/report/metrics.py) and a client scrapes them every 0.25 s
(four times the test's 1 s, twenty times Prometheus's default 15 s... of a 5 s setting), while a
ticker reads the run's progress every second as the terminal display does. The engine loop's own
per-request counting is always on (plain integer increments). Prints each trial's wall time and
the median ratio on/off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.config import MetricsConfig, ModelConfig, SamplingConfig  # noqa: E402
from tasks.engines.vllm import SharedVllmEngine, engine_counts, get_engine  # noqa: E402
from tasks.keys import content_hash  # noqa: E402
from tasks.prepare.render import request_content  # noqa: E402
from tasks.report.metrics import serving_metrics  # noqa: E402
from tasks.report.progress import RunProgress  # noqa: E402


def shards_of(count: int, size: int, trial: int) -> list[pa.Table]:
    tables = []
    for s in range(count):
        prompts = [f"Trial {trial}, question {s}-{i}: what follows {i}?" for i in range(size)]
        contents = [request_content(p, "Be brief.", "chat") for p in prompts]
        tables.append(
            pa.table(
                {
                    "request_key": [content_hash(c) for c in contents],
                    "prompt": prompts,
                    "messages": [json.dumps(c["messages"]) for c in contents],
                    "overrides": pa.array([None] * size, pa.string()),
                }
            )
        )
    return tables


def run_shards(engine: SharedVllmEngine, shards: list[pa.Table], sampling: SamplingConfig) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:  # three shards in flight, as sharding.shards_in_flight
        list(pool.map(lambda shard: engine.generate(shard, sampling, "bench"), shards))
    return time.perf_counter() - started


def with_metrics(engine: SharedVllmEngine, shards: list[pa.Table], sampling: SamplingConfig) -> tuple[float, int]:
    progress = RunProgress(sum(s.num_rows for s in shards), len(shards), live=engine_counts)
    stop, scrapes = threading.Event(), [0]
    with serving_metrics(
        MetricsConfig(port=0, final_scrape_seconds=0), "bench", progress, {"dataset": "b", "model": "m", "engine": "vllm"}, True
    ) as port:

        def scrape() -> None:
            while not stop.wait(0.25):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
                scrapes[0] += 1

        def tick() -> None:
            while not stop.wait(1.0):
                progress.snapshot()

        threads = [threading.Thread(target=scrape), threading.Thread(target=tick)]
        for thread in threads:
            thread.start()
        seconds = run_shards(engine, shards, sampling)
        stop.set()
        for thread in threads:
            thread.join()
    return seconds, scrapes[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=512)
    args = parser.parse_args()
    model = ModelConfig(model=str(ROOT / ".cache/models/tiny-llama"), max_model_len=1024, gpu_memory_utilization=0.15)
    sampling = SamplingConfig(max_tokens=16)
    engine = SharedVllmEngine(model)
    get_engine(model)
    run_shards(engine, shards_of(1, 256, -1), sampling)  # warm up
    off, on = [], []
    for pair in range(args.pairs):
        order = ("off", "on") if pair % 2 == 0 else ("on", "off")
        for mode in order:
            shards = shards_of(args.shards, args.shard_size, 2 * pair + (mode == "on"))
            if mode == "off":
                off.append(run_shards(engine, shards, sampling))
                print(f"pair {pair} off: {off[-1]:.2f} s", flush=True)
            else:
                seconds, scrapes = with_metrics(engine, shards, sampling)
                on.append(seconds)
                print(f"pair {pair} on:  {seconds:.2f} s ({scrapes} scrapes)", flush=True)
    requests = args.shards * args.shard_size
    print(
        f"{requests} requests per trial; median off {statistics.median(off):.2f} s, on {statistics.median(on):.2f} s; "
        f"on/off {statistics.median(on) / statistics.median(off):.3f}"
    )


if __name__ == "__main__":
    main()
