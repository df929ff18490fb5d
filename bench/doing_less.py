"""Doing less, measured: the pipeline against bare `vllm.LLM.chat` over every row, on a realistic workload.

The workload: chat rows that each start with one of a few few-shot preambles (the system message,
~670 tokens each with the chat template), then a short question; 10% of the rows repeat an earlier row exactly; each row
asks for its own number of output tokens (4-64, a `max_tokens` column), so outputs vary in length.

Four whole processes, one after the other, in one run:
  bare-all     `LLM.chat` over every row, in file order (what a script around vLLM does)
  bare-unique  the same over the unique rows only, in file order
  bare-sorted  the unique rows ordered by preamble, as the pipeline's prefix grouping orders them
  pipeline     `vbf run` on the dataset (dedupe, prefix grouping, journal, per-shard commits, scores)
bare-all / pipeline is the headline (target >= 1.15); bare-all / bare-unique is what dedupe buys,
bare-unique / bare-sorted what ordering for the prefix cache buys, bare-sorted / pipeline what the
pipeline's own work costs.

    PYTHONPATH=. .venv/bin/python bench/doing_less.py [--rows 10000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import (
    ENGINE_ARGS,
    MODEL,
    REPO,
    build_tiny_model,
    create_prefect_database,
    prefect_env,
    run_bare,
    timed,
    vbf_run,
)

PREAMBLES = 4
DUPLICATE_SHARE = 0.10

BARE = textwrap.dedent(
    """
    import json, sys, time
    import pyarrow.parquet as pq

    if __name__ == "__main__":
        started = time.perf_counter()
        from vllm import LLM, SamplingParams
        out, data, engine_args, model, order = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
        llm = LLM(model=model, **engine_args)
        loaded = time.perf_counter()
        table = pq.read_table(data)
        rows = json.loads(open(order).read())  # which rows, in which order
        messages, max_tokens = table["messages"].to_pylist(), table["max_tokens"].to_pylist()
        conversations = [messages[i] for i in rows]
        params = [SamplingParams(temperature=0, max_tokens=max_tokens[i], seed=0) for i in rows]
        outputs = llm.chat(conversations, params, use_tqdm=False)
        done = time.perf_counter()
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        json.dump({"engine_start": loaded - started, "generate": done - loaded, "completion_tokens": tokens, "rows": len(outputs)}, open(out, "w"))
    """
)


def few_shot_preamble(examples: list[str], index: int) -> str:
    shots = "\n".join(f"Q: {question}\nA: {answer}" for question, answer in zip(examples[::2], examples[1::2]))
    return f"Task {index}: answer in the style of these examples.\n{shots}"


def write_workload(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path, list[int], list[int]]:
    """The dataset (Parquet + spec), the unique rows in file order, and the same ordered by preamble."""
    rng = np.random.default_rng(seed)
    sample = [p for p in pq.read_table(REPO / "datasets/sample/prompts.parquet")["prompt"].to_pylist() if p and p.strip()]
    preambles = [few_shot_preamble(list(rng.choice(sample, 12)), i) for i in range(PREAMBLES)]
    preamble_of = rng.integers(0, PREAMBLES, rows)
    questions = [f"{sample[rng.integers(len(sample))]} (case {i})" for i in range(rows)]
    max_tokens = rng.integers(4, 65, rows)
    for i in np.flatnonzero(rng.random(rows) < DUPLICATE_SHARE):
        if i:  # an exact repeat of an earlier row: the same request
            source = int(rng.integers(0, i))
            preamble_of[i], questions[i], max_tokens[i] = preamble_of[source], questions[source], max_tokens[source]
    messages = [
        [{"role": "system", "content": preambles[p]}, {"role": "user", "content": q}] for p, q in zip(preamble_of, questions)
    ]
    parquet = folder / "workload.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "messages": messages, "max_tokens": max_tokens}), parquet)
    spec = folder / "spec.yaml"
    spec.write_text(
        "name: doing-less\nsource: workload.parquet\nid_column: id\nmessages_column: messages\noverride_columns: [max_tokens]\n"
    )
    seen, unique = set(), []
    for i, key in enumerate(zip(preamble_of.tolist(), questions, max_tokens.tolist())):
        if key not in seen:
            seen.add(key)
            unique.append(i)
    by_preamble = sorted(unique, key=lambda i: int(preamble_of[i]))
    return parquet, spec, unique, by_preamble


def preamble_tokens(parquet: Path) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    systems = {m[0]["content"] for m in pq.read_table(parquet)["messages"].to_pylist()}
    return float(np.mean([len(tokenizer(s)["input_ids"]) for s in systems]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    build_tiny_model()
    with tempfile.TemporaryDirectory(prefix="bench-doing-less-") as tmp:
        folder = Path(tmp)
        parquet, spec, unique, by_preamble = write_workload(folder, args.rows)
        orders = {"bare-all": list(range(args.rows)), "bare-unique": unique, "bare-sorted": by_preamble}
        create_prefect_database(folder)
        env, measured = prefect_env(folder), {}
        for name, order in orders.items():
            (folder / f"{name}-order.json").write_text(json.dumps(order))
            arguments = [str(parquet), json.dumps(ENGINE_ARGS), str(MODEL), str(folder / f"{name}-order.json")]
            measured[name] = run_bare(BARE, folder, name, arguments, env)
            print(f"{name:12s} {measured[name]['wall']:7.1f} s  ({measured[name]['rows']} rows)", flush=True)
        run_dir = folder / "pipeline"
        pipeline_wall = timed([*vbf_run(["--spec", str(spec)], run_dir, 64), "--summary-json", str(run_dir / "s.json")], env)
        summary = json.loads((run_dir / "s.json").read_text())
        print(f"{'pipeline':12s} {pipeline_wall:7.1f} s  ({summary['unique_requests']} unique of {summary['requests']} rows)")
        assert summary["completion_tokens"] == measured["bare-unique"]["completion_tokens"], "pipeline and bare disagree"
        print(
            f"\n{args.rows} rows, {PREAMBLES} few-shot preambles of ~{preamble_tokens(parquet):.0f} tokens, "
            f"{DUPLICATE_SHARE:.0%} exact repeats, max_tokens 4-64 per row, tiny model on CPU"
        )
        walls = {name: m["wall"] for name, m in measured.items()} | {"pipeline": pipeline_wall}
        print(f"  pipeline vs bare over every row, whole process: {walls['bare-all'] / walls['pipeline']:.3f}  (target >= 1.15)")
        print(f"  what dedupe buys        bare-all / bare-unique:    {walls['bare-all'] / walls['bare-unique']:.3f}")
        print(f"  what ordering buys      bare-unique / bare-sorted: {walls['bare-unique'] / walls['bare-sorted']:.3f}")
        print(f"  the pipeline's own cost bare-sorted / pipeline:    {walls['bare-sorted'] / walls['pipeline']:.3f}")
        print(
            "  engine-only generate seconds: "
            + ", ".join(f"{n} {m['generate']:.1f}" for n, m in measured.items())
            + f", pipeline {summary['stage_seconds']['generate']:.1f}"
        )


if __name__ == "__main__":
    main()
