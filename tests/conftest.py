"""Shared fixtures: the tiny model, one vLLM engine per session, the Prefect test harness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = REPO / ".cache" / "models" / "tiny-llama"
SAMPLE_PARQUET = REPO / "datasets" / "sample" / "prompts.parquet"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), str(TINY_MODEL_DIR)], check=True)
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir) -> Path:
    return tiny_model_dir.with_name(tiny_model_dir.name + "-lora")  # built by the same script


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The one engine configuration of the session: every test that uses it shares one vLLM engine.

    LoRA is enabled so runs with and without an adapter share the engine too.
    """
    from tasks.config import ModelConfig

    return ModelConfig(
        model=str(tiny_model_dir), max_model_len=256, gpu_memory_utilization=0.1, enable_lora=True, max_lora_rank=8
    )


def pytest_collection_modifyitems(items):
    """Tests that replace the session's engine run last, so the others keep sharing one engine."""
    items.sort(key=lambda item: item.get_closest_marker("replaces_engine") is not None)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # The harness does not isolate result storage: give the session its own folder.
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-storage")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session", autouse=True)
def close_engine_at_exit():
    yield
    from tasks.engine import close_engine

    close_engine()


@pytest.fixture
def commit_inputs(tmp_path):
    """One small run's commit files: three requests (one a duplicate), one answer and one error row."""
    import pyarrow as pa

    from tasks import files
    from tasks.engine import OUTPUT_SCHEMA
    from tasks.score import resolve_scorers, score_outputs
    from tasks.store import CommitFiles

    requests = pa.table(
        {
            "custom_id": ["a", "b", "c"],
            "request_key": ["k1", "k2", "k1"],
            "prompt": ["p1", "p2", "p1"],
            "messages": [None, None, None],
            "overrides": pa.array([None, None, None], pa.string()),
            "source_file": ["f"] * 3,
            "source_row": [0, 1, 2],
            "duplicate_of": [None, None, "a"],
            "reference": [None, "r2", None],
        }
    )
    outputs = pa.Table.from_pylist(
        [
            {"request_key": "k1", "sample_index": 0, "text": "x", "finish_reason": "length",
             "prompt_tokens": 3, "completion_tokens": 4, "error_code": None, "error": None},
            {"request_key": "k2", "sample_index": 0, "text": None, "finish_reason": None,
             "prompt_tokens": 999, "completion_tokens": None, "error_code": "context_length_exceeded", "error": "long"},
        ],
        schema=OUTPUT_SCHEMA,
    )
    scores = score_outputs(outputs, resolve_scorers(["completion_tokens", "finish_reason", "empty_output"]))
    outputs = outputs.append_column("shard_key", pa.array(["s1", "s1"])).append_column("output_key", pa.array(["o1", "o1"]))
    paths = {name: str(tmp_path / f"{name}.parquet") for name in ("requests", "outputs", "scores")}
    files.write_parquet(requests, paths["requests"])
    files.write_parquet(outputs, paths["outputs"])
    files.write_parquet(scores, paths["scores"])
    run = {
        "run_id": "r1", "dataset_version": "dv1", "dataset_name": "t", "model": "m", "model_fingerprint": "fp",
        "engine": "vllm", "engine_args": "{}", "sampling_params": "{}", "sampling_hash": "sh", "template_hash": "th",
        "scorers": "x", "code_version": "0", "started_at": "2026-01-01 00:00:00+00", "finished_at": "2026-01-01 00:01:00+00",
        "wall_seconds": 60.0, "rows_read": 3, "rejected": 0, "requests": 3, "unique_requests": 2, "duplicates": 1,
        "shards": 1, "cached_shards": 0, "engine_requests": 1, "outputs": 2, "errors": 1, "prompt_tokens": 3,
        "completion_tokens": 4, "generated_tokens": 4, "tokens_per_second": 0.1,
    }
    dataset = {"dataset_version": "dv1", "dataset_name": "t", "source": "f", "spec": "{}", "template_hash": "th",
               "rows_read": 3, "requests": 3, "unique_requests": 2, "rejected": 0}
    shards = [{"shard_key": "s1", "output_key": "o1", "requests": 2, "errors": 1, "prompt_tokens": 3,
               "completion_tokens": 4, "generate_seconds": 1.0, "cached": False}]
    commit_files = CommitFiles(requests=[paths["requests"]], rejected=[], outputs=[paths["outputs"]], scores=[paths["scores"]])
    return run, dataset, shards, commit_files


@pytest.fixture
def reference_slice(tmp_path):
    """The first 40 rows of the bundled sample (with duplicates) plus a reference answer per row, one
    null prompt (a rejected row) and one prompt longer than the tiny model's context (an error row)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tasks.config import DatasetSpec

    table = pq.read_table(SAMPLE_PARQUET).slice(0, 40)
    prompts = table["prompt"].to_pylist()
    prompts[3], prompts[4] = None, " ".join(["photosynthesis"] * 400)
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string()))
    words = pc.utf8_split_whitespace(pc.fill_null(table["prompt"], ""))
    reference = pa.array([(w[-1] if w else None) for w in words.to_pylist()], pa.string())
    path = tmp_path / "slice.parquet"
    pq.write_table(table.append_column("answer", reference), path)
    return DatasetSpec(name="slice", source=str(path), id_column="id", prompt_column="prompt",
                       reference_column="answer", system_prompt="Be brief.")  # fmt: skip
