"""What the benchmarks share: the tiny model, its engine arguments, and the commands they time."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / ".cache" / "models" / "tiny-llama"
# As the flow's tiny CPU default (tasks/config.py TINY_CPU_MODEL), eager included: both sides of a
# comparison start the engine the way `make demo` does.
ENGINE_ARGS = {"max_model_len": 1024, "gpu_memory_utilization": 0.15, "enforce_eager": True, "seed": 0}
ENGINE_FLAGS = [  # the same, as flags of `vbf run` and of vLLM's run_batch
    "--max-model-len",
    str(ENGINE_ARGS["max_model_len"]),
    "--gpu-memory-utilization",
    str(ENGINE_ARGS["gpu_memory_utilization"]),
    "--enforce-eager",
]
VBF = str(Path(sys.executable).parent / "vbf")


def build_tiny_model() -> None:
    subprocess.run([sys.executable, str(REPO / "scripts/build_tiny_model.py")], check=True, stdout=subprocess.DEVNULL)


def prefect_env(folder: Path) -> dict:
    return {**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def create_prefect_database(folder: Path) -> None:
    """Prefect creates its database on a machine's first run: once, before anything is timed."""
    seconds = timed([sys.executable, "-c", "from prefect import flow; flow(lambda: None)()"], prefect_env(folder))
    print(f"Prefect's database created in {seconds:.1f} s (a first run on a machine pays this once)", flush=True)


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def vbf_run(dataset: list[str], run_dir: Path, max_tokens: int) -> list[str]:
    """`vbf run` on the tiny model with the benchmarks' engine arguments, results in run_dir."""
    return [
        VBF,
        "run",
        *dataset,
        "--model",
        str(MODEL),
        *ENGINE_FLAGS,
        "--max-tokens",
        str(max_tokens),
        "--duckdb",
        str(run_dir / "results.duckdb"),
        "--storage",
        str(run_dir / "storage"),
    ]


def run_bare(script: str, folder: Path, name: str, arguments: list[str], env: dict) -> dict:
    """A bare-vLLM script (source text taking its output JSON path first) as a whole process: wall time + what it wrote."""
    path = folder / f"{name}.py"
    path.write_text(script)
    out = folder / f"{name}.json"
    wall = timed([sys.executable, str(path), str(out), *arguments], env)
    return {"wall": wall, **json.loads(out.read_text())}


def chat_batch_arguments(doc: str) -> argparse.Namespace:
    """--requests, --max-tokens, --rounds: the arguments of the benchmarks on one chat batch."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    return parser.parse_args()


def vllm_run_batch(batch: Path, output: Path, served_name: str | None = None) -> list[str]:
    """vLLM's own batch runner on an OpenAI batch file, with the benchmarks' engine arguments."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(batch),
        "-o",
        str(output),
        "--model",
        str(MODEL),
        *(["--served-model-name", served_name] if served_name else []),
        *ENGINE_FLAGS,
        "--seed",
        str(ENGINE_ARGS["seed"]),
    ]
