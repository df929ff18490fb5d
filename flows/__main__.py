"""python -m flows: run batch-inference from the command line.

    python -m flows                                        # the bundled sample on the tiny CPU model
    python -m flows --spec my/spec.yaml --model /models/llama --max-tokens 256

The vLLM engine takes the longest to start, so it starts first, in the background, and its start
overlaps Prefect's start-up and the dataset's preparation. This module imports Prefect and the
flow only after that: the engine's start is on the critical path, and vLLM's spawned processes
skip a `__main__` module of a package, so they do not import the flow's dependencies again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.config import SAMPLE_DATASET, TINY_CPU_MODEL, DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, SpecError, StoreConfig


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

    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from flows.batch_inference import batch_inference
    from tasks.engine import close_engine
    from tasks.report import format_summary
    from tasks.score import DEFAULT_SCORERS

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
    """Start loading the engine now — unless an earlier run answered this very input with this
    model and sampling, when no request will need it."""
    if model.engine != "vllm":
        return
    from tasks.engine import model_fingerprint, sampling_hash, start_engine_in_background
    from tasks.reuse import answered_before, input_fingerprint

    try:
        fingerprint = input_fingerprint(dataset, model.mode, model.max_model_len)
    except SpecError:
        return  # the flow reports a bad source with its context
    if not answered_before(store.duckdb_path, fingerprint, model_fingerprint(model), sampling_hash(sampling)):
        start_engine_in_background(model)


if __name__ == "__main__":
    main()
