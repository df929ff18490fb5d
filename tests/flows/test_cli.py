"""The command line: `python -m flows` runs batch-inference, and a re-run of the same input starts no engine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENGINE_START = "Initializing a V1 LLM engine"  # vLLM's engine process logs this as it starts


def run_cli(tmp_path: Path, name: str, spec: Path, model_dir: Path) -> tuple[dict, str]:
    summary = tmp_path / f"{name}.json"
    completed = subprocess.run(
        [
            sys.executable, "-m", "flows", "--spec", str(spec), "--model", str(model_dir), "--max-tokens", "4",
            "--duckdb", str(tmp_path / "results.duckdb"), "--storage", str(tmp_path / "storage"),
            "--summary-json", str(summary),
        ],
        cwd=ROOT,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(summary.read_text()), completed.stdout + completed.stderr


def test_the_cli_answers_a_spec_and_a_rerun_never_starts_the_engine(tmp_path, tiny_model_dir):
    pq.write_table(pq.read_table(ROOT / "datasets/sample/prompts.parquet").slice(0, 12), tmp_path / "prompts.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: cli\nsource: prompts.parquet\nid_column: id\nprompt_column: prompt\n")

    first, first_log = run_cli(tmp_path, "first", spec, tiny_model_dir)
    assert first["engine_requests"] == first["unique_requests"] > 0
    assert ENGINE_START in first_log and f"run {first['run_id']}" in first_log  # the summary is printed

    second, second_log = run_cli(tmp_path, "second", spec, tiny_model_dir)
    assert second["engine_requests"] == 0 and second["reused_requests"] == first["unique_requests"]
    assert ENGINE_START not in second_log  # the results file already answers this input: no engine was loaded
