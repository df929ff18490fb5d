"""Shards through the engine loop vs one `LLM.generate` call per shard, on the same engine in one process.

    .venv/bin/python bench/engine_loop.py [--shards 8] [--shard-size 1024]

Completion lengths vary like real answers (a heavy-tailed max_tokens per request, 1–200): a
generate call per shard drains the running batch at the end of every shard, while the engine
loop keeps adding the next shard's requests. Prints both wall times and the ratio, best of 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.config import ModelConfig, SamplingConfig  # noqa: E402
from tasks.engines import vllm as engine_module  # noqa: E402
from tasks.engines.vllm import SharedVllmEngine, vllm_sampling_params  # noqa: E402
from tasks.keys import content_hash  # noqa: E402
from tasks.prepare.render import request_content  # noqa: E402


def shards_of(count: int, size: int) -> list[pa.Table]:
    rng = random.Random(0)
    tables = []
    for s in range(count):
        prompts = [
            f"Question {s}-{i}: name {rng.randint(2, 9)} things that are {rng.choice(['red', 'round', 'loud'])}."
            for i in range(size)
        ]
        contents = [request_content(p, "Be brief.", "chat") for p in prompts]
        tables.append(
            pa.table(
                {
                    "request_key": [content_hash(c) for c in contents],
                    "prompt": prompts,
                    "messages": [json.dumps(c["messages"]) for c in contents],
                    "overrides": [json.dumps({"max_tokens": int(rng.paretovariate(1.2) * 8) % 200 + 1}) for _ in prompts],
                }
            )
        )
    return tables


def per_shard_generate(engine, shards: list[pa.Table], sampling: SamplingConfig) -> float:
    """The baseline: each shard is one blocking LLM.generate call, one after the other."""
    prepared = [engine.prepare(shard, sampling)[0] for shard in shards]
    started = time.perf_counter()
    for pending in prepared:
        params = [vllm_sampling_params(r.sampling, r.sampling.max_tokens) for r in pending]
        engine.llm.generate([{"prompt_token_ids": r.token_ids} for r in pending], params, use_tqdm=False)
    return time.perf_counter() - started


def engine_loop(model: ModelConfig, shards: list[pa.Table], sampling: SamplingConfig) -> float:
    """The pipeline: shard threads hand their requests to the engine loop (tokenizing in their own thread)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda shard: SharedVllmEngine(model).generate(shard, sampling, "bench"), shards))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1024)
    args = parser.parse_args()
    model = ModelConfig(model=str(ROOT / ".cache/models/tiny-llama"), max_model_len=1024, gpu_memory_utilization=0.15)
    engine = engine_module.get_engine(model)
    shards = shards_of(args.shards, args.shard_size)
    sampling = SamplingConfig(max_tokens=200)
    baseline = min(per_shard_generate(engine, shards, sampling) for _ in range(2))
    looped = min(engine_loop(model, shards, sampling) for _ in range(2))
    print(f"{args.shards} shards x {args.shard_size} requests, max_tokens 1-200 (heavy-tailed), tiny model on CPU, best of 2")
    print(f"  one LLM.generate per shard (drains between shards)   {baseline:6.2f} s")
    print(f"  engine loop (next shard joins the running batch)     {looped:6.2f} s")
    print(f"  ratio loop / per-shard generate = {looped / baseline:.3f}")
    engine_module.close_engine(timeout=0)


if __name__ == "__main__":
    main()
