"""Prepare's Prefect tasks: write the dataset's requests, check what was rejected, write the shards."""

from __future__ import annotations

from prefect import task

from blocks import secret_value
from tasks import storage
from tasks.config import DatasetSpec, Mode, RerunConfig, SpecError, StoreConfig
from tasks.inference.job import InferenceJob
from tasks.prepare.requests import RequestSet, ShardPlan, plan_shards, prepare_requests, rejected_share_error
from tasks.store.queries import answered_keys, cut_off_keys


@task(name="write-requests")
def write_requests(dataset: DatasetSpec, mode: Mode, storage_root: str, context_tokens: int | None = None) -> RequestSet:
    """Load, render, validate and dedupe the dataset into request and rejected-row files (kept per input)."""
    if dataset.source_secret:  # the URL with its credentials, read here only: the spec keeps naming `source`
        dataset = dataset.model_copy(update={"source": secret_value(dataset.source_secret)})
    return prepare_requests(dataset, mode, storage_root, context_tokens)


@task(name="check-rejected-share")
def check_rejected_share(request_set: RequestSet, dataset: DatasetSpec) -> None:
    """Fail the run, before anything is stored, when too much of the dataset is rejected."""
    if error := rejected_share_error(request_set, dataset):
        raise SpecError(error)


@task(name="write-shards")
def write_shards(
    request_set: RequestSet, job: InferenceJob, store: StoreConfig, work_dir: str, rerun: RerunConfig | None = None
) -> ShardPlan:
    """Shard files of the unique requests the results file has no answer for yet (for this model and
    sampling); a rerun's: of those whose answer in the earlier run was cut off."""
    answered = answered_keys(store.duckdb_path, job.model_fingerprint, job.sampling_hash, store.lock_timeout_seconds)
    only = cut_off_keys(store.duckdb_path, rerun.run_id, rerun.cut_off, store.lock_timeout_seconds) if rerun else None
    return plan_shards(request_set, job.sharding, job.storage, answered, work_dir, only)


@task(name="remove-work-files")
def remove_work_files(work_dir: str) -> None:
    storage.remove_tree(work_dir)
