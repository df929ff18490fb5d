"""Inference benchmarks, measured side by side in one run on the tiny CPU model.

1. The pipeline vs bare `vllm.LLM.generate` on the same prompts and engine arguments:
   throughput ratio (target >= 0.95), end to end and for the generate phase alone.
2. The whole pipeline process (`vbf run`) vs vLLM's own batch runner (`python -m vllm.entrypoints.openai.run_batch`)
   on the same chat requests written as an OpenAI batch file: ratio of whole-process wall times (target <= 1.0).
3. The cached re-run's wall time as a fraction of the first run's (target <= 0.03).
4. Where the pipeline's time goes (prepare, shard, engine start, generate, score, commit).

    .venv/bin/python bench/bench_inference.py [--requests 20000] [--max-tokens 16] [--rounds 1]

Every command runs as its own process, one after the other, in the order bare, pipeline, cached
re-run, run_batch; with --rounds N the sequence repeats and medians are reported.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import (
    ENGINE_ARGS,
    MODEL,
    REPO,
    build_tiny_model,
    chat_batch_arguments,
    create_prefect_database,
    prefect_env,
    run_bare,
    timed,
    vbf_run,
    vllm_run_batch,
)

SYSTEM = "You are a helpful assistant."

BARE = textwrap.dedent(
    """
    import json, sys, time
    import pyarrow.parquet as pq

    if __name__ == "__main__":
        started = time.perf_counter()
        from vllm import LLM, SamplingParams
        out, data, max_tokens, engine_args, system = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
        llm = LLM(model=sys.argv[6], **engine_args)
        loaded = time.perf_counter()
        tokenizer = llm.get_tokenizer()
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in pq.read_table(data)["prompt"].to_pylist()
        ]
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, seed=0), use_tqdm=False)
        done = time.perf_counter()
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        json.dump({"engine_start": loaded - started, "generate": done - loaded, "completion_tokens": tokens}, open(out, "w"))
    """
)


def write_inputs(folder: Path, requests: int, max_tokens: int) -> tuple[Path, Path, Path]:
    """The same unique chat requests as Parquet (+ spec) and as an OpenAI batch input file."""
    sample = [p for p in pq.read_table(REPO / "datasets/sample/prompts.parquet")["prompt"].to_pylist() if p and p.strip()]
    base = list(dict.fromkeys(sample))
    prompts = [f"{base[i % len(base)]} (case {i})" for i in range(requests)]
    parquet = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(requests)], "prompt": prompts}), parquet)
    spec = folder / "spec.yaml"
    spec.write_text(f"name: bench\nsource: prompts.parquet\nid_column: id\nprompt_column: prompt\nsystem_prompt: {SYSTEM}\n")
    batch = folder / "batch.jsonl"
    with batch.open("w") as out:
        for i, prompt in enumerate(prompts):
            body = {
                "model": str(MODEL),
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "seed": 0,
            }
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")
    return parquet, spec, batch


def one_round(folder: Path, parquet: Path, spec: Path, batch: Path, max_tokens: int, round_index: int) -> dict:
    env = prefect_env(folder)
    bare = run_bare(
        BARE, folder, f"bare-{round_index}", [str(parquet), str(max_tokens), json.dumps(ENGINE_ARGS), SYSTEM, str(MODEL)], env
    )
    run_dir = folder / f"run-{round_index}"
    pipeline = vbf_run(["--spec", str(spec)], run_dir, max_tokens)
    first_wall = timed([*pipeline, "--summary-json", str(run_dir / "first.json")], env)
    cached_wall = timed([*pipeline, "--summary-json", str(run_dir / "cached.json")], env)
    run_batch_wall = timed(vllm_run_batch(batch, folder / f"out-{round_index}.jsonl"), env)
    first = json.loads((run_dir / "first.json").read_text())
    cached = json.loads((run_dir / "cached.json").read_text())
    assert first["completion_tokens"] == bare["completion_tokens"], "pipeline and bare vLLM generated different tokens"
    assert cached["cached_shards"] == cached["shards"] and cached["engine_requests"] == 0
    return {
        "bare_wall": bare["wall"],
        "bare_engine_start": bare["engine_start"],
        "bare_generate": bare["generate"],
        "pipeline_wall": first_wall,
        "pipeline_flow_wall": first["wall_seconds"],
        "pipeline_generate": first["stage_seconds"]["generate"],
        "stages": first["stage_seconds"],
        "cached_wall": cached_wall,
        "cached_flow_wall": cached["wall_seconds"],
        "run_batch_wall": run_batch_wall,
        "completion_tokens": first["completion_tokens"],
        "shards": first["shards"],
    }


def main() -> None:
    args = chat_batch_arguments(__doc__)
    build_tiny_model()

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder, args.requests, args.max_tokens)
        create_prefect_database(folder)
        rounds = []
        for i in range(args.rounds):
            rounds.append(one_round(folder, *inputs, args.max_tokens, i))
            r = rounds[-1]
            print(
                f"round {i + 1}: bare {r['bare_wall']:.1f} s, pipeline {r['pipeline_wall']:.1f} s, "
                f"cached {r['cached_wall']:.1f} s, run_batch {r['run_batch_wall']:.1f} s",
                flush=True,
            )

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def ratio(numerator: str, denominator: str) -> float:
        return statistics.median(r[numerator] / r[denominator] for r in rounds)

    tokens = rounds[0]["completion_tokens"]
    print(
        f"{args.requests} unique chat requests x max {args.max_tokens} tokens ({tokens} completion tokens), "
        f"tiny model on CPU, {rounds[0]['shards']} shards, {args.rounds} round(s), medians"
    )
    print(
        f"  bare LLM.generate     process {median('bare_wall'):7.1f} s  (engine start {median('bare_engine_start'):.1f} s, generate {median('bare_generate'):.1f} s)"
    )
    print(
        f"  pipeline, first run   process {median('pipeline_wall'):7.1f} s  (flow {median('pipeline_flow_wall'):.1f} s, generate {median('pipeline_generate'):.1f} s)"
    )
    print(f"  pipeline, cached      process {median('cached_wall'):7.1f} s  (flow {median('cached_flow_wall'):.2f} s)")
    print(f"  vLLM run_batch        process {median('run_batch_wall'):7.1f} s")
    print("ratios")
    print(f"  throughput pipeline / bare, whole process    {ratio('bare_wall', 'pipeline_wall'):.3f}   (target >= 0.95)")
    print(f"  throughput pipeline / bare, generate phase   {ratio('bare_generate', 'pipeline_generate'):.3f}")
    print(f"  wall pipeline / run_batch, whole process     {ratio('pipeline_wall', 'run_batch_wall'):.3f}   (target <= 1.0)")
    print(
        f"  cached re-run / first run, flow wall         {ratio('cached_flow_wall', 'pipeline_flow_wall'):.4f}  (target <= 0.03)"
    )
    print(f"  cached re-run / first run, whole process     {ratio('cached_wall', 'pipeline_wall'):.3f}")
    stages = rounds[len(rounds) // 2]["stages"]
    print("where the pipeline's flow time goes (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
