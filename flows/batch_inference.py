"""batch_inference: a dataset of prompts in, one versioned, scored output per unique request in DuckDB.

From the command line: `python -m flows` (see flows/__main__.py).
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, task
from prefect.runtime import flow_run

from blocks.model import InferenceModel
from blocks.store import ResultsStore
from tasks import files
from tasks.config import (
    SAMPLE_DATASET, TINY_CPU_MODEL, DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, StoreConfig, WorkersConfig,
)  # fmt: skip
from tasks.dispatch import Dispatch, generate_shards_of_run
from tasks.engine import sampling_hash
from tasks.infer import fingerprint_model
from tasks.prepare import check_rejected_share, write_requests, write_shards
from tasks.report import RunSummary, StageClock, publish_report, publish_summary, publish_validation, summarize_run
from tasks.score import DEFAULT_SCORERS, ScorerSpec, write_scores
from tasks.store import commit_results


@task(name="remove-work-files")
def remove_work_files(work_dir: str) -> None:
    files.remove_tree(work_dir)


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    dataset: DatasetSpec = SAMPLE_DATASET,
    model: ModelConfig | str = TINY_CPU_MODEL,
    sampling: SamplingConfig = SamplingConfig(),
    sharding: ShardingConfig = ShardingConfig(),
    store: StoreConfig | str = StoreConfig(),
    scorers: list[str | ScorerSpec] = DEFAULT_SCORERS,
    dispatch: Dispatch = "local",
    n_workers: int = 2,
    workers: WorkersConfig = WorkersConfig(),
) -> RunSummary:
    """`model` and `store` take the configuration or the name of a saved block. dispatch="workers"
    runs the shards in n_workers groups on the shard-worker deployment (see flows/generate_shards.py)."""
    model, store = InferenceModel.resolve(model), ResultsStore.resolve(store)
    clock, started_at = StageClock(), datetime.now(timezone.utc)
    run_id = flow_run.id or f"local-{started_at:%Y%m%dT%H%M%S%f}"
    work_dir = files.join(store.storage, "work", run_id)

    with clock("prepare"):
        request_set = write_requests(dataset, model.mode, store.storage, model.max_model_len)
        publish_validation(request_set, dataset.name)
        check_rejected_share(request_set, dataset)
    fingerprint = fingerprint_model(model)
    with clock("shard"):
        plan = write_shards(request_set, sharding, store, fingerprint, sampling_hash(sampling), work_dir)
    with clock("infer"):
        outputs, cached = generate_shards_of_run(
            dispatch, plan.shards, model, sampling, fingerprint, store.storage, sharding, n_workers, workers,
            f"{len(plan.shards)} shards of {dataset.name} on {model.model}",
        )  # fmt: skip
    with clock("score"):
        score_files = write_scores(outputs, request_set, scorers, store.storage)
    summary = summarize_run(
        run_id, dataset.name, model, fingerprint, request_set, outputs, cached, clock, store.duckdb_path, plan.reused_requests
    )
    with clock("commit"):
        commit_results(summary, dataset, model, sampling, scorers, request_set, outputs, cached, score_files, started_at, store)
    summary.stage_seconds["commit"] = clock.seconds["commit"]
    publish_summary(summary)
    publish_report(summary, score_files)
    remove_work_files(work_dir)
    return summary
