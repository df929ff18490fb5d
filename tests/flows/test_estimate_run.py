"""The dry run against the run it prices, on real vLLM: the same counts, the prompt tokens the engine
then reports, the output tokens and engine time of a sample within a stated factor, the cost at the
given rate; and nothing stored by the dry run itself."""

from pathlib import Path

import pytest

from flows.batch_inference import batch_inference
from flows.estimate_run import estimate_run
from tasks.config import PricingConfig, SamplingConfig

pytestmark = pytest.mark.slow

# The sample runs 48 requests at once, the run hundreds: its rate is lower, so its time is higher,
# by less than this factor on the tiny model (measured: see docs/inference.md#dry-run).
TIME_FACTOR = 3.0


def test_a_dry_run_counts_what_the_run_then_does_and_prices_it(prefect_harness, tiny_model, sample_spec, store, query):
    spec = sample_spec(400)
    sampling = SamplingConfig(max_tokens=12)
    pricing = PricingConfig(per_million_tokens=2.0)
    estimate = estimate_run(dataset=spec, model=tiny_model, sampling=sampling, store=store, pricing=pricing, sample=48)
    assert not Path(store.duckdb_path).exists()  # the dry run stored nothing

    summary = batch_inference(dataset=spec, model=tiny_model, sampling=sampling, store=store)
    counts = ("rows_read", "rejected", "requests", "unique_requests", "duplicates")
    assert [getattr(estimate, name) for name in counts] == [getattr(summary, name) for name in counts]
    assert estimate.duplicates > 0  # the slice has some
    assert estimate.answered_before == 0 and estimate.requests_to_send == summary.engine_requests > 300
    ((prompt_tokens, completion_tokens),) = query(
        store.duckdb_path, "SELECT sum(prompt_tokens), sum(completion_tokens) FROM outputs WHERE error_code IS NULL"
    )
    assert estimate.prompt_tokens_exact and estimate.prompt_tokens == prompt_tokens  # exact: the engine's own count
    assert estimate.output_tokens_from == "sample" and 0.5 * completion_tokens <= estimate.expected_output_tokens <= 12 * 400
    generate = summary.stage_seconds["generate"]
    assert generate / TIME_FACTOR <= estimate.engine_seconds <= generate * TIME_FACTOR, (estimate.engine_seconds, generate)
    assert estimate.cost == pytest.approx((estimate.prompt_tokens + estimate.expected_output_tokens) / 1e6 * 2.0)

    # Again after the run: everything is answered, and the rate comes from the run in the results file.
    again = estimate_run(dataset=spec, model=tiny_model, sampling=sampling, store=store)
    assert again.answered_before == summary.unique_requests and again.requests_to_send == 0 and again.prompt_tokens == 0
    assert again.throughput_from == "earlier runs"
    assert again.tokens_per_second == pytest.approx(summary.generated_tokens / generate)
    # Other sampling is not answered yet: all of it would be sent, at the rate of this model's earlier runs.
    other = estimate_run(dataset=spec, model=tiny_model, sampling=SamplingConfig(max_tokens=5), store=store)
    assert other.requests_to_send == summary.unique_requests and other.expected_output_tokens == 5 * summary.unique_requests
    assert other.engine_seconds == pytest.approx(other.expected_output_tokens / again.tokens_per_second)
