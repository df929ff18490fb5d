"""batch_inference: a dataset of prompts in, one versioned, scored output per unique request in DuckDB.

From the command line: `vbf run` (see flows/cli.py).
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import partial

from prefect import flow
from prefect.runtime import flow_run

from blocks import resolve
from blocks.model import InferenceModel
from blocks.store import ResultsStore
from flows.estimate_run import estimate_run
from tasks import storage
from tasks.config import (
    SAMPLE_DATASET,
    TINY_CPU_MODEL,
    DatasetSpec,
    MetricsConfig,
    ModelConfig,
    RerunConfig,
    SamplingConfig,
    ShardingConfig,
    StoreConfig,
    WorkersConfig,
)
from tasks.engines.faults import ensure_reaper
from tasks.inference.estimate import RunEstimate
from tasks.inference.job import InferenceJob, ShardOutput, check_sampling
from tasks.inference.tasks import Dispatch, fingerprint_model, generate_shards_of_run
from tasks.prepare.requests import RequestSet
from tasks.prepare.tasks import check_rejected_share, remove_work_files, write_requests, write_shards
from tasks.report.metrics import serving_metrics, writing_progress
from tasks.report.progress import RunProgress, live_counts
from tasks.report.summary import (
    RunSummary,
    StageClock,
    counts_at_start,
    dataset_version_row,
    input_files,
    run_row,
    shard_counts,
    shard_row,
    summarize_run,
)
from tasks.report.tasks import publish_report, publish_summary, publish_validation
from tasks.scoring.registry import DEFAULT_SCORERS, resolve_scorers, scorers_version
from tasks.scoring.scorers import ScorerSpec
from tasks.scoring.tasks import score_files_of, write_scores
from tasks.store.commit import CommitFiles
from tasks.store.rows import RunRow
from tasks.store.tasks import commit_run_end, commit_run_start, commit_shard_results, marked_if_stopped


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
    metrics: MetricsConfig = MetricsConfig(),
    dry_run: bool = False,
    rerun: RerunConfig | None = None,
) -> RunSummary | RunEstimate:
    """`model` and `store` take the configuration or the name of a saved block. dispatch="workers"
    runs the shards in n_workers groups on the shard-worker deployment (see flows/generate_shards.py).
    `metrics.port` serves the run's Prometheus metrics while it goes (docs/monitoring.md).
    dry_run: only price the job (flows/estimate_run.py), from earlier runs' rate; nothing runs.
    rerun: ask only the requests whose answer in that earlier run was cut off (flows/rerun_cut_off.py)."""
    if dry_run:
        return estimate_run(dataset=dataset, model=model, sampling=sampling, store=store)
    ensure_reaper()  # killed outright, this process leaves no engine nor temporary Prefect server behind
    model, store = resolve(model, InferenceModel), resolve(store, ResultsStore)
    scorers_used = scorers_version(resolve_scorers(scorers))  # an unknown scorer fails the run before any work
    check_sampling(model, sampling)  # and so do sampling values vLLM would refuse
    clock, started_at = StageClock(), datetime.now(timezone.utc)
    run_id = str(flow_run.id or f"local-{started_at:%Y%m%dT%H%M%S%f}")
    work_dir = storage.join(store.storage, "work", run_id)

    with clock("prepare"):
        request_set = write_requests(dataset, model.mode, store.storage, model.max_model_len)
        publish_validation(request_set, dataset.name)
        check_rejected_share(request_set, dataset)
    job = InferenceJob(
        model=model,
        sampling=sampling,
        model_fingerprint=fingerprint_model(model, store.storage),
        storage=store.storage,
        sharding=sharding,
    )
    with clock("shard"):
        plan = write_shards(request_set, job, store, work_dir, rerun)
    describe = partial(
        run_row,
        run_id=run_id,
        dataset=dataset,
        job=job,
        scorers=scorers_used,
        request_set=request_set,
        rerun_of=rerun.run_id if rerun else None,
    )
    running = describe(
        counts_at_start(request_set, len(plan.shards), plan.reused_requests), started_at=started_at, status="running"
    )
    commit_run_start(running, dataset_version_row(dataset, request_set), input_files(request_set), store)
    commit = partial(score_and_commit_shard, run=running, request_set=request_set, scorers=scorers, store=store, clock=clock)
    engine_here = dispatch == "local" and model.engine == "vllm"  # the engine runs in this process: counted per request
    progress = RunProgress(request_set.unique_requests, len(plan.shards), plan.reused_requests, live_counts(engine_here))
    labels = {"dataset": dataset.name, "model": model.model, "engine": model.engine}
    with (
        marked_if_stopped(run_id, store),
        clock("infer"),
        serving_metrics(metrics, run_id, progress, labels, engine_here),
        writing_progress(metrics.progress_file, progress),
    ):
        description = f"{len(plan.shards)} shards of {dataset.name} on {model.model}"
        outputs, cached = generate_shards_of_run(dispatch, plan.shards, job, n_workers, workers, description, commit, progress)
    summary = summarize_run(
        run_id, dataset.name, job, request_set, outputs, cached, clock, store.duckdb_path, plan.reused_requests
    )
    with clock("commit"):
        commit_run_end(describe(summary, started_at=started_at, status="completed", stage_seconds=summary.stage_seconds), store)
    summary.stage_seconds["commit"] = clock.seconds["commit"]
    publish_summary(summary)
    publish_report(summary, score_files_of(outputs, request_set, scorers, store.storage))
    remove_work_files(work_dir)
    return summary


def score_and_commit_shard(
    output: ShardOutput,
    cached: bool,
    *,
    run: RunRow,
    request_set: RequestSet,
    scorers: list[str | ScorerSpec],
    store: StoreConfig,
    clock: StageClock,
) -> None:
    """A finished shard, while the run goes on: scored, then committed with its scores (each timed, within infer)."""
    with clock.adding("score"):
        score_files = write_scores([output], request_set, scorers, store.storage)
    files = CommitFiles(requests=[], rejected=[], outputs=[output.path], scores=score_files)
    with clock.adding("commit_shards"):
        commit_shard_results(run, shard_row(run.run_id, output, cached), shard_counts(output, cached), files, store)
