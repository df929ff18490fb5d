"""batch_inference: a dataset of prompts in, one versioned, scored output per unique request in DuckDB.

    python -m flows.batch_inference                       # the bundled sample on the tiny CPU model
    python -m flows.batch_inference --spec my/spec.yaml --model /models/llama --max-tokens 256
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from blocks.model import InferenceModel
from blocks.store import ResultsStore
from tasks import files
from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, SpecError, StoreConfig, WorkersConfig
from tasks.dispatch import Dispatch, generate_shards_of_run
from tasks.engine import close_engine, model_fingerprint, sampling_hash, start_engine_in_background
from tasks.infer import fingerprint_model
from tasks.prepare import check_rejected_share, input_fingerprint, write_requests, write_shards
from tasks.report import (
    RunSummary, StageClock, format_summary, publish_report, publish_summary, publish_validation, summarize_run,
)  # fmt: skip
from tasks.score import DEFAULT_SCORERS, ScorerSpec, write_scores
from tasks.store import answered_before, commit_results

SAMPLE_DATASET = DatasetSpec(
    name="sample",
    source="datasets/sample/prompts.parquet",
    id_column="id",
    prompt_column="prompt",
    system_prompt="You are a helpful assistant.",
)
TINY_CPU_MODEL = ModelConfig(model=".cache/models/tiny-llama", max_model_len=1024, gpu_memory_utilization=0.15)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="dataset spec YAML (default: the bundled sample)")
    parser.add_argument("--model", default=TINY_CPU_MODEL.model, help="local model folder")
    parser.add_argument("--max-tokens", type=int, default=SamplingConfig().max_tokens)
    parser.add_argument("--shard-size", type=int, default=ShardingConfig().shard_size)
    parser.add_argument("--duckdb", default=StoreConfig().duckdb_path, help="results file")
    parser.add_argument("--storage", default=StoreConfig().storage, help="shard files and cached results")
    parser.add_argument("--summary-json", help="also write the run summary to this file")
    parser.add_argument("--scorer", action="append", help="scorer name or package.module:attribute (repeatable)")
    args = parser.parse_args()

    model = TINY_CPU_MODEL.model_copy(update={"model": args.model})
    dataset = DatasetSpec.from_yaml(args.spec) if args.spec else SAMPLE_DATASET
    sampling = SamplingConfig(max_tokens=args.max_tokens)
    store = StoreConfig(duckdb_path=args.duckdb, storage=args.storage)
    start_engine_unless_answered(dataset, model, sampling, store)
    # The engine's start competes with Prefect's temporary server for the CPU: on a small machine
    # the server can need longer than Prefect's default 20 s to come up.
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        summary = batch_inference(
            dataset=dataset,
            model=model,
            sampling=sampling,
            sharding=ShardingConfig(shard_size=args.shard_size),
            store=store,
            scorers=args.scorer or DEFAULT_SCORERS,
        )
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(summary.model_dump_json(indent=2))
    close_engine(timeout=0)  # everything is committed: nothing for the engine to drain


def start_engine_unless_answered(dataset: DatasetSpec, model: ModelConfig, sampling: SamplingConfig, store: StoreConfig) -> None:
    """The engine takes the longest to start: load it while Prefect starts and the dataset is
    prepared — unless an earlier run answered this very input, when no request will need it."""
    if model.engine != "vllm":
        return
    try:
        fingerprint = input_fingerprint(dataset, model.mode, model.max_model_len)
    except SpecError:
        return  # the flow reports a bad source with its context
    if not answered_before(store.duckdb_path, fingerprint, model_fingerprint(model), sampling_hash(sampling)):
        start_engine_in_background(model)


if __name__ == "__main__":
    main()
