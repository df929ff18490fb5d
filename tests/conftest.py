"""Shared fixtures: the tiny model, one vLLM engine per session, the Prefect test harness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
