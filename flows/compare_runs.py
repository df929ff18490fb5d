"""compare_runs: run two or more variants (models, sampling, prompt templates) on one dataset and compare them.

Each variant is a full `batch_inference` run (cached like any other). The comparison is recorded in
the `comparisons` table; the views `comparison_scores` (per-scorer means with 95% CIs) and
`comparison_win_rates` (pairwise wins per scorer, e.g. the judge's) hold the result, and a markdown
artifact shows it with a chart.

    python -m flows.compare_runs            # greedy vs sampled on the bundled sample, tiny model, with a judge
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.batch_inference import batch_inference
from tasks.compare import Comparison, Variant, check_variants, publish_comparison, variant_dataset, write_comparison
from tasks.config import SAMPLE_DATASET, TINY_CPU_MODEL, DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, StoreConfig
from tasks.score import DEFAULT_SCORERS, ScorerSpec


class ComparisonResult(BaseModel):
    comparison: Comparison
    chart_path: str


@flow(name="compare-runs", log_prints=True)
def compare_runs(
    variants: list[Variant],
    dataset: DatasetSpec = SAMPLE_DATASET,
    model: ModelConfig = TINY_CPU_MODEL,
    sampling: SamplingConfig = SamplingConfig(),
    sharding: ShardingConfig = ShardingConfig(),
    store: StoreConfig = StoreConfig(),
    scorers: list[str | ScorerSpec] = DEFAULT_SCORERS,
) -> ComparisonResult:
    check_variants(variants)
    runs = {
        variant.name: batch_inference(
            dataset=variant_dataset(dataset, variant),
            model=variant.model or model,
            sampling=variant.sampling or sampling,
            sharding=sharding,
            store=store,
            scorers=scorers,
        ).run_id
        for variant in variants
    }
    comparison_id = flow_run.id or f"local-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
    comparison = write_comparison(comparison_id, runs, store.duckdb_path, store.lock_timeout_seconds)
    chart_path = publish_comparison(comparison, store.storage)
    print(f"comparison {comparison_id}: SELECT * FROM comparison_scores WHERE comparison_id = '{comparison_id}'")
    return ComparisonResult(comparison=comparison, chart_path=chart_path)


if __name__ == "__main__":
    compare_runs(
        variants=[
            Variant(name="greedy", sampling=SamplingConfig(temperature=0.0)),
            Variant(name="sampled", sampling=SamplingConfig(temperature=0.8, seed=1)),
        ],
        scorers=[*DEFAULT_SCORERS, ScorerSpec(name="judge", options={"model": TINY_CPU_MODEL.model_dump()})],
    )
