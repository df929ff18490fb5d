"""Dispatch: run the shard tasks in this process, or in groups as runs of the shard-worker deployment.

Either way every shard goes through the same cached `generate_shard` task writing to the same
result storage, so the cache is how the runs hand results back: a group's flow run only has to
finish, and the parent reads each shard's manifest from the cache by its content key.
"""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.filesystems import LocalFileSystem
from prefect.futures import PrefectFuture
from prefect.results import ResultStore
from prefect.runtime import flow_run

from tasks.config import ModelConfig, SamplingConfig, ShardingConfig, WorkersConfig
from tasks.infer import ShardOutput, collect_shard_outputs, generate_shard, output_key, result_storage, wait_with_progress
from tasks.shard import Shard

Dispatch = Literal["local", "workers"]


def split_groups(shards: list[Shard], n_groups: int) -> list[list[Shard]]:
    """At most n_groups groups of about equal requests; each keeps the shards' order."""
    loads = [0] * max(1, n_groups)
    members: list[list[int]] = [[] for _ in loads]
    for index in sorted(range(len(shards)), key=lambda i: -shards[i].requests):
        lightest = loads.index(min(loads))
        loads[lightest] += shards[index].requests
        members[lightest].append(index)
    return [[shards[i] for i in sorted(group)] for group in members if group]


def submit_shards(
    shards: list[Shard], model: ModelConfig, sampling: SamplingConfig, fingerprint: str, storage: str,
    sharding: ShardingConfig,
) -> list[PrefectFuture]:  # fmt: skip
    generate = generate_shard.with_options(
        result_storage=result_storage(storage),
        retries=sharding.retries,
        retry_delay_seconds=sharding.retry_delay_seconds,
    )
    return [generate.submit(shard, model, sampling, fingerprint, storage, sharding.gpu_limit) for shard in shards]


def shard_cache(storage: str) -> ResultStore:
    """The result store the shard tasks persist to, readable from any process that sees the storage."""
    return ResultStore(result_storage=LocalFileSystem(basepath=str(result_storage(storage))))


@task(name="run-shard-group", cache_policy=NO_CACHE)
def run_shard_group(
    group: int, shards: list[Shard], model: ModelConfig, sampling: SamplingConfig, fingerprint: str, storage: str,
    sharding: ShardingConfig, workers: WorkersConfig,
) -> str:  # fmt: skip
    """One flow run of the shard-worker deployment for this group; raises unless it Completed."""
    devices = workers.devices[group % len(workers.devices)] if workers.devices else None
    run = run_deployment(
        workers.deployment,
        parameters={
            "shards": [shard.model_dump() for shard in shards],
            "model": model.model_dump(mode="json"),
            "sampling": sampling.model_dump(mode="json"),
            "model_fingerprint": fingerprint,
            "storage": storage,
            "sharding": sharding.model_dump(mode="json"),
        },
        job_variables={"env": {"CUDA_VISIBLE_DEVICES": devices}} if devices is not None else None,
        flow_run_name=f"{flow_run.name or 'batch-inference'}-group-{group}",
        poll_interval=workers.poll_seconds,
    )
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"shard group {group} ({len(shards)} shards): flow run {run.name} ended {state}")
    return run.name


def generate_on_workers(
    shards: list[Shard], model: ModelConfig, sampling: SamplingConfig, fingerprint: str, storage: str,
    sharding: ShardingConfig, n_workers: int, workers: WorkersConfig, description: str,
) -> tuple[list[ShardOutput], list[bool]]:  # fmt: skip
    """Dispatch the shards not yet in the cache in n_workers groups, wait, read every manifest back."""
    cache = shard_cache(storage)
    keys = [output_key(shard.shard_key, fingerprint, sampling) for shard in shards]
    cached = [cache.exists(key) for key in keys]
    groups = split_groups([shard for shard, hit in zip(shards, cached) if not hit], n_workers)
    get_run_logger().info(
        "%d of %d shards already cached; dispatching %d in %d groups to %s",
        sum(cached), len(shards), len(shards) - sum(cached), len(groups), workers.deployment,
    )
    run_group = run_shard_group.with_options(retries=workers.group_retries, retry_delay_seconds=5)
    futures = [
        run_group.submit(i, group, model, sampling, fingerprint, storage, sharding, workers)
        for i, group in enumerate(groups)
    ]
    wait_with_progress(futures, description, unit="group")  # raises the error of a group that failed all its attempts
    return [cache.read(key).result for key in keys], cached


def generate_shards_of_run(
    dispatch: Dispatch, shards: list[Shard], model: ModelConfig, sampling: SamplingConfig, fingerprint: str,
    storage: str, sharding: ShardingConfig, n_workers: int, workers: WorkersConfig, description: str,
) -> tuple[list[ShardOutput], list[bool]]:  # fmt: skip
    """Every shard's manifest, and whether it came from the cache."""
    if dispatch == "workers":
        return generate_on_workers(shards, model, sampling, fingerprint, storage, sharding, n_workers, workers, description)
    futures = submit_shards(shards, model, sampling, fingerprint, storage, sharding)
    return collect_shard_outputs(futures, description)
