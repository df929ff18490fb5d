"""Inference's Prefect tasks: one cached task per shard, run here or in groups on the shard-worker
deployment. The cache key is the content of the work (see `keys.output_key`), never the run, and
the cache is how worker groups hand results back: a group's run only has to finish."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.filesystems import LocalFileSystem
from prefect.futures import PrefectFuture, as_completed
from prefect.results import ResultStore
from prefect.runtime import flow_run
from tqdm import tqdm

from blocks import secret_value
from tasks import keys, storage
from tasks.config import ModelConfig, WorkersConfig
from tasks.engines import open_engine
from tasks.inference.job import (
    PERMANENT_ERRORS,
    InferenceJob,
    ShardOutput,
    check_model,
    output_file,
    split_groups,
    summarize_outputs,
)
from tasks.prepare.shard import Shard

Dispatch = Literal["local", "workers"]


def shard_cache_key(_context, parameters: dict) -> str:
    return parameters["job"].output_key(parameters["shard"])


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
    if gpu_limit is None or model.engine != "vllm":
        yield
        return
    with _slot_lock, concurrency(gpu_limit, occupy=model.tensor_parallel_size, strict=False):
        yield


@task(name="generate-shard", cache_key_fn=shard_cache_key, persist_result=True, retry_condition_fn=is_transient)
def generate_shard(shard: Shard, job: InferenceJob) -> ShardOutput:
    key, path = job.output_key(shard), job.output_path(shard)
    engine = open_engine(job.model, secret_value(job.model.api_key_secret), job.storage)
    with engine_slot(job.model, job.sharding.gpu_limit):
        result = engine.generate(storage.read_parquet(shard.path), job.sampling, key)
    storage.write_parquet(output_file(shard, key, result.outputs), path)
    return summarize_outputs(shard, key, path, result)


@task(name="fingerprint-model")
def fingerprint_model(model: ModelConfig) -> str:
    check_model(model)
    return keys.model_fingerprint(model)


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


def generate_here(shards: list[Shard], job: InferenceJob, description: str) -> tuple[list[ShardOutput], list[bool]]:
    """Every shard in this process: each shard's manifest, and whether it came from the cache."""
    generate = generate_shard.with_options(
        result_storage=job.result_storage(),
        retries=job.sharding.retries,
        retry_delay_seconds=job.sharding.retry_delay_seconds,
    )
    futures = [generate.submit(shard, job) for shard in shards]
    wait_with_progress(futures, description, unit="shard")
    return [future.result() for future in futures], [future.state.name == "Cached" for future in futures]


@task(name="run-shard-group", cache_policy=NO_CACHE)
def run_shard_group(group: int, shards: list[Shard], job: InferenceJob, workers: WorkersConfig) -> str:
    """One flow run of the shard-worker deployment for this group; raises unless it Completed."""
    devices = workers.devices[group % len(workers.devices)] if workers.devices else None
    run = run_deployment(
        workers.deployment,
        parameters={"shards": [shard.model_dump() for shard in shards], "job": job.model_dump(mode="json")},
        job_variables={"env": {"CUDA_VISIBLE_DEVICES": devices}} if devices is not None else None,
        flow_run_name=f"{flow_run.name or 'batch-inference'}-group-{group}",
        poll_interval=workers.poll_seconds,
    )
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"shard group {group} ({len(shards)} shards): flow run {run.name} ended {state}")
    return run.name


def generate_on_workers(
    shards: list[Shard], job: InferenceJob, n_workers: int, workers: WorkersConfig, description: str
) -> tuple[list[ShardOutput], list[bool]]:
    """Dispatch the shards not yet in the cache in n_workers groups, wait, read every manifest back."""
    cache = ResultStore(result_storage=LocalFileSystem(basepath=str(job.result_storage())))
    output_keys = [job.output_key(shard) for shard in shards]
    cached = [cache.exists(key) for key in output_keys]
    groups = split_groups([shard for shard, hit in zip(shards, cached) if not hit], n_workers)
    get_run_logger().info(
        "%d of %d shards already cached; dispatching %d in %d groups to %s",
        sum(cached),
        len(shards),
        len(shards) - sum(cached),
        len(groups),
        workers.deployment,
    )
    run_group = run_shard_group.with_options(retries=workers.group_retries, retry_delay_seconds=5)
    futures = [run_group.submit(i, group, job, workers) for i, group in enumerate(groups)]
    wait_with_progress(futures, description, unit="group")  # raises the error of a group that failed all its attempts
    return [cache.read(key).result for key in output_keys], cached


def generate_shards_of_run(
    dispatch: Dispatch, shards: list[Shard], job: InferenceJob, n_workers: int, workers: WorkersConfig, description: str
) -> tuple[list[ShardOutput], list[bool]]:
    """Every shard's manifest, and whether it came from the cache."""
    if dispatch == "workers":
        return generate_on_workers(shards, job, n_workers, workers, description)
    return generate_here(shards, job, description)
