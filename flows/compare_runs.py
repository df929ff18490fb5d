"""compare_runs: run two or more variants (models, sampling, prompt templates) on one dataset and compare them.

Each variant is a full `batch_inference` run (cached like any other). The comparison is recorded in
the `comparisons` table; the views `comparison_scores` (per-scorer means with 95% CIs) and
`comparison_win_rates` (wins by each scorer's direction, with Wilson intervals) hold the result, the
table `comparison_differences` the paired differences of means with their bootstrap intervals and
sign-test p-values, and a markdown artifact reports them with charts, significant or not at
`significance_level`. From the command line: `vbf compare`.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from blocks import resolve
from blocks.model import InferenceModel
from blocks.store import ResultsStore
from flows.batch_inference import batch_inference
from tasks.config import SAMPLE_DATASET, TINY_CPU_MODEL, DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, StoreConfig
from tasks.report.tasks import publish_comparison
from tasks.scoring.compare import (
    BootstrapConfig,
    Comparison,
    Variant,
    check_significance_level,
    check_variants,
    variant_dataset,
)
from tasks.scoring.registry import DEFAULT_SCORERS
from tasks.scoring.scorers import ScorerSpec
from tasks.scoring.tasks import compute_differences
from tasks.store.tasks import read_comparison, write_comparison, write_differences


class ComparisonResult(BaseModel):
    comparison: Comparison
    chart_path: str  # the means chart; the differences chart sits beside it (`-differences.png`)


@flow(name="compare-runs", log_prints=True)
def compare_runs(
    variants: list[Variant],
    dataset: DatasetSpec = SAMPLE_DATASET,
    model: ModelConfig | str = TINY_CPU_MODEL,
    sampling: SamplingConfig = SamplingConfig(),
    sharding: ShardingConfig = ShardingConfig(),
    store: StoreConfig | str = StoreConfig(),
    scorers: list[str | ScorerSpec] = DEFAULT_SCORERS,
    significance_level: float = 0.05,
    bootstrap: BootstrapConfig = BootstrapConfig(),
) -> ComparisonResult:
    """`model` and `store` take the configuration or the name of a saved block (the compare-runs deployment names
    `tiny-cpu` and `local-results`)."""
    model, store = resolve(model, InferenceModel), resolve(store, ResultsStore)
    check_variants(variants)
    check_significance_level(significance_level)
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
    comparison_id = str(flow_run.id or f"local-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
    write_comparison(comparison_id, runs, store)
    write_differences(compute_differences(comparison_id, list(runs), bootstrap, store), store)
    scores, win_rates, differences = read_comparison(comparison_id, store)
    comparison = Comparison(
        comparison_id=comparison_id,
        runs=runs,
        scores=scores,
        win_rates=win_rates,
        differences=differences,
        significance_level=significance_level,
    )
    chart_path = publish_comparison(comparison, store.storage)
    print(f"comparison {comparison_id}: SELECT * FROM comparison_scores WHERE comparison_id = '{comparison_id}'")
    return ComparisonResult(comparison=comparison, chart_path=chart_path)
