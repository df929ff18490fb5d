"""The tiny model compiled (vLLM's default) against eager (`enforce_eager`): engine start and generation.

    PYTHONPATH=. .venv/bin/python bench/engine_start.py [--prompts 2000] [--max-tokens 64] [--rounds 3]

Each round starts one process per mode, in turn (compiled, eager, compiled, ...): it builds `vllm.LLM`
with the flow's tiny CPU engine arguments, then generates the prompts (ignore_eos, so every answer has
max_tokens tokens). Prints each round's seconds and the medians' ratios eager / compiled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench.common import ENGINE_ARGS, MODEL, build_tiny_model

ONE_RUN = """
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    args, prompts, max_tokens = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    started = time.perf_counter()
    llm = LLM(**args)
    ready = time.perf_counter()
    texts = [f"Tell me about the number {i} and its friends" for i in range(prompts)]
    llm.generate(texts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    print("RESULT", json.dumps({"start": ready - started, "generate": time.perf_counter() - ready}), flush=True)
"""


def one_run(eager: bool, prompts: int, max_tokens: int) -> dict:
    args = {"model": str(MODEL), **ENGINE_ARGS, "enforce_eager": eager}
    command = [sys.executable, "-c", ONE_RUN, json.dumps(args), str(prompts), str(max_tokens)]
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    (result,) = [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return {**json.loads(result), "process": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    build_tiny_model()
    runs = {"compiled": [], "eager": []}
    for round_index in range(options.rounds):
        for mode in runs:
            runs[mode].append(one_run(mode == "eager", options.prompts, options.max_tokens))
            figures = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in runs[mode][-1].items())
            print(f"round {round_index + 1} {mode:8}: {figures}", flush=True)
    for figure in ("start", "generate", "process"):
        medians = {mode: statistics.median(run[figure] for run in runs[mode]) for mode in runs}
        print(
            f"{figure:8} median: compiled {medians['compiled']:.1f} s, eager {medians['eager']:.1f} s, "
            f"eager / compiled {medians['eager'] / medians['compiled']:.2f}"
        )


if __name__ == "__main__":
    main()
