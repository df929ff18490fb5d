"""Infer: one cached task per shard; the cache key is the content of the work, never the run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture, as_completed
from pydantic import BaseModel
from tqdm import tqdm

from tasks import files
from tasks.config import ModelConfig, SamplingConfig, SpecError
from tasks.engine import GenerateResult, generate_with_engine, model_fingerprint, sampling_hash
from tasks.openai_engine import generate_over_http
from tasks.render import content_hash
from tasks.shard import Shard


class ShardOutput(BaseModel):
    shard_key: str
    output_key: str
    path: str
    requests: int
    outputs: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    generate_seconds: float
    batch_size: int  # requests per generate call (smaller after an out-of-memory)
    max_num_seqs: int | None  # the engine's; None for the openai engine
    engine_load_seconds: float  # how long the process's first shard waited for the engine to start

    @property
    def engine_requests(self) -> int:
        """Requests that reached the engine (the rest failed their checks before it)."""
        return self.requests - self.errors


def output_key(shard_key: str, model_fingerprint: str, sampling: SamplingConfig) -> str:
    """What a shard's outputs depend on: its requests, the model as loaded, the sampling."""
    return content_hash(
        {"task": "generate-shard", "shard": shard_key, "model": model_fingerprint, "sampling": sampling_hash(sampling)}
    )


def shard_cache_key(_context, parameters: dict) -> str:
    return output_key(parameters["shard"].shard_key, parameters["model_fingerprint"], parameters["sampling"])


def summarize_outputs(shard: Shard, key: str, path: str, result: GenerateResult) -> ShardOutput:
    outputs = result.outputs
    ok = outputs.filter(pc.is_null(outputs["error_code"]))
    return ShardOutput(
        shard_key=shard.shard_key,
        output_key=key,
        path=path,
        requests=shard.requests,
        outputs=outputs.num_rows,
        errors=outputs.num_rows - ok.num_rows,
        prompt_tokens=pc.sum(ok["prompt_tokens"]).as_py() or 0,
        completion_tokens=pc.sum(ok["completion_tokens"]).as_py() or 0,
        generate_seconds=result.seconds,
        batch_size=result.batch_size,
        max_num_seqs=result.max_num_seqs,
        engine_load_seconds=result.engine_load_seconds,
    )


def wait_with_progress(futures: list[PrefectFuture], description: str, unit: str) -> None:
    """Wait for every future, showing progress in the UI and the terminal; then raise the first failure.

    Everything finishes before a failure is raised, so every finished shard is in the cache for
    the re-run.
    """
    artifact = create_progress_artifact(0.0 if futures else 100.0, key="batch-inference-progress", description=description)
    with tqdm(total=len(futures), desc=f"{unit}s", unit=unit, disable=None) as bar:
        for done, _ in enumerate(as_completed(futures), 1):
            update_progress_artifact(artifact, 100.0 * done / len(futures))
            bar.update()
    for future in futures:
        if not future.state.is_completed():
            future.result()  # raises its error


def collect_shard_outputs(futures: list[PrefectFuture], description: str) -> tuple[list[ShardOutput], list[bool]]:
    wait_with_progress(futures, description, unit="shard")
    return [future.result() for future in futures], [future.state.name == "Cached" for future in futures]


# Retrying cannot fix a configuration mistake: those fail at once with their message.
PERMANENT_ERRORS = (SpecError, ValueError, TypeError, FileNotFoundError, ImportError)


def is_transient(_task, _task_run, state) -> bool:
    return not isinstance(state.data, PERMANENT_ERRORS)


# The shards of one process share its one engine and take turns on it anyway: they share one slot.
_slot_lock = threading.Lock()


@contextmanager
def engine_slot(model: ModelConfig, gpu_limit: str | None) -> Iterator[None]:
    """Hold the model's GPUs in the global concurrency limit while this shard loads and runs the engine.

    Taken inside the task body, so a cached shard returns at once without waiting for a GPU; taken
    by one shard of a process at a time, so a process never holds more slots than its one engine needs.
    """
    if gpu_limit is None:
        yield
        return
    with _slot_lock, concurrency(gpu_limit, occupy=model.tensor_parallel_size, strict=False):
        yield


@task(
    name="generate-shard",
    cache_key_fn=shard_cache_key,
    persist_result=True,
    retry_condition_fn=is_transient,
)
def generate_shard(
    shard: Shard,
    model: ModelConfig,
    sampling: SamplingConfig,
    model_fingerprint: str,
    storage: str,
    gpu_limit: str | None = None,
) -> ShardOutput:
    key = output_key(shard.shard_key, model_fingerprint, sampling)
    requests = files.read_parquet(shard.path)
    if model.engine == "openai":
        result = generate_over_http(model, requests, sampling)
    else:
        with engine_slot(model, gpu_limit):
            result = generate_with_engine(model, requests, sampling, key)
    outputs = result.outputs
    outputs = outputs.append_column("shard_key", pa.array([shard.shard_key] * outputs.num_rows, pa.string()))
    outputs = outputs.append_column("output_key", pa.array([key] * outputs.num_rows, pa.string()))
    path = files.join(storage, "outputs", f"{key}.parquet")
    files.write_parquet(outputs, path)
    return summarize_outputs(shard, key, path, result)


def check_model(model: ModelConfig) -> None:
    """A local model folder that is not there is a configuration mistake: say so before any work."""
    looks_local = model.model.startswith((".", "/", "~")) or Path(model.model).exists()
    if looks_local and not (Path(model.model).expanduser() / "config.json").is_file():
        raise SpecError(
            f"model {model.model}: no model folder with a config.json there "
            "(for the bundled tiny model run `make tiny-model`)"
        )


@task(name="fingerprint-model")
def fingerprint_model(model: ModelConfig) -> str:
    check_model(model)
    return model_fingerprint(model)


def result_storage(storage: str) -> Path:
    """Where Prefect persists shard results (the cache records), next to the shard files."""
    if "://" in storage:
        raise SpecError(f"storage {storage}: only a local folder is supported in this version")
    return Path(storage, "prefect-results").resolve()
