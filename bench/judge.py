"""What a judgement costs: the pairwise judge (each pair in both orders) against the absolute judge (each
answer graded alone) on the same comparisons, side by side in one run.

The workload: `--comparisons` distinct short chat prompts answered by two runs on the tiny model
(greedy and sampled, `max_tokens` 16), then `judge_runs` over the two runs, pairwise and absolute
(choice verdicts, the tiny model as its own judge). Both judges send two requests per comparison:
pairwise shows both answers twice (A/B, then B/A), absolute grades each answer once. One process, one
engine started before anything is timed; each round judges in a results file of its own, the two
judges in alternating order. Printed per judge and 1,000 comparisons: the judge flow's wall seconds,
the engine's generate seconds, prompt and output tokens; then pairwise / absolute, and what each
judge concluded (ties, position bias).

    PYTHONPATH=. .venv/bin/python bench/judge.py [--comparisons 200] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import ENGINE_ARGS, MODEL, build_tiny_model
from bench.logprobs import prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparisons", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-judge-"))
    os.environ.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    build_tiny_model()
    from flows.commands import start_prefect

    start_prefect(verbose=False)  # Prefect's batch-command defaults (a longer start-up timeout on a busy machine)

    from flows.batch_inference import batch_inference
    from flows.judge_runs import judge_runs
    from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, StoreConfig
    from tasks.engines.vllm import close_engine, get_engine
    from tasks.scoring.judge import JudgeConfig

    pq.write_table(prompts(args.comparisons), work / "prompts.parquet")
    dataset = DatasetSpec(name="judged", source=str(work / "prompts.parquet"), id_column="id", prompt_column="prompt")
    model = ModelConfig(model=str(MODEL), **ENGINE_ARGS)
    answers = {"greedy": SamplingConfig(max_tokens=16), "sampled": SamplingConfig(max_tokens=16, temperature=1.0, seed=3)}
    judges = {"pairwise": JudgeConfig(model=model), "absolute": JudgeConfig(model=model, kind="absolute")}
    get_engine(model)  # started before anything is timed
    results: dict[str, list[dict]] = {name: [] for name in judges}
    try:
        for round_ in range(args.rounds):
            run_dir = work / f"round-{round_}"
            store = StoreConfig(duckdb_path=str(run_dir / "results.duckdb"), storage=str(run_dir / "storage"))
            runs = [
                batch_inference(dataset=dataset, model=model, sampling=s, store=store, scorers=[]).run_id
                for s in answers.values()
            ]
            order = list(judges) if round_ % 2 == 0 else list(reversed(judges))
            for name in order:
                started = time.perf_counter()
                result = judge_runs(run_a=runs[0], run_b=runs[1], judge=judges[name], store=store)
                judged, judgement = result.judge_run, result.judgement
                results[name].append(
                    {
                        "comparisons": judgement.pairs,
                        "requests": judged.engine_requests,
                        "wall": time.perf_counter() - started,
                        "generate": judged.stage_seconds["generate"],
                        "prompt_tokens": judged.prompt_tokens,
                        "output_tokens": judged.completion_tokens,
                        "ties": judgement.ties / judgement.pairs,
                        "position_bias": judgement.position_bias,
                        "unparseable": judgement.unparseable,
                    }
                )
                print(name, round_, results[name][-1], flush=True)
    finally:
        close_engine(timeout=0)

    per_1k = {
        name: {
            key: sum(r[key] * 1000 / r["comparisons"] for r in rows) / len(rows)
            for key in ("requests", "wall", "generate", "prompt_tokens", "output_tokens")
        }
        for name, rows in results.items()
    }
    print(f"\n{args.comparisons} comparisons (answers of 16 tokens), {args.rounds} round(s); per 1,000 comparisons")
    print(
        "| judge | requests | judge flow wall s | engine generate s | prompt tokens | output tokens | ties | position bias | unparseable |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in per_1k.items():
        last = results[name][-1]
        bias = "–" if last["position_bias"] is None else f"{last['position_bias']:.2f}"
        print(
            f"| {name} | {m['requests']:,.0f} | {m['wall']:.1f} | {m['generate']:.1f} | {m['prompt_tokens']:,.0f} | "
            f"{m['output_tokens']:,.0f} | {last['ties']:.2f} | {bias} | {last['unparseable']} |"
        )
    pairwise, absolute = per_1k["pairwise"], per_1k["absolute"]
    print(
        "pairwise / absolute: "
        + ", ".join(
            f"{key} {pairwise[key] / absolute[key]:.2f}" for key in ("wall", "generate", "prompt_tokens", "output_tokens")
        )
    )


if __name__ == "__main__":
    main()
