import asyncio

import duckdb
import pytest
from prefect.client.orchestration import get_client

from blocks.model import InferenceModel
from blocks.store import ResultsStore
from flows.compare_runs import compare_runs
from tasks.config import LoraAdapter, SamplingConfig, ShardingConfig
from tasks.scoring.compare import BootstrapConfig, Variant, paired_difference, sign_test_p_value, wilson_interval
from tasks.scoring.judge import UNPARSEABLE
from tasks.scoring.registry import DEFAULT_SCORERS
from tasks.scoring.scorers import ScorerSpec


async def read_artifact(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.mark.slow
def test_sampling_and_lora_variants_are_compared_with_intervals_tests_by_direction_and_a_report(
    prefect_harness, tiny_model, tiny_lora_dir, reference_slice, store
):
    judge = ScorerSpec(name="judge", options={"model": tiny_model.model_dump(), "sampling": {"max_tokens": 8}})
    # the model and the results file named by saved blocks, as the compare-runs deployment names them
    InferenceModel(config=tiny_model).save("compared-model", overwrite=True)
    ResultsStore(config=store).save("compared-results", overwrite=True)

    result = compare_runs(
        variants=[
            Variant(name="greedy"),
            Variant(name="sampled", sampling=SamplingConfig(temperature=1.0, seed=7, max_tokens=8, logprobs=0)),
            Variant(
                name="lora", model=tiny_model.model_copy(update={"lora_adapter": LoraAdapter(name="a", path=str(tiny_lora_dir))})
            ),
        ],
        dataset=reference_slice,
        model="compared-model",
        sampling=SamplingConfig(max_tokens=8),
        sharding=ShardingConfig(shard_size=16),
        store="compared-results",
        scorers=[*DEFAULT_SCORERS, judge],
        significance_level=0.1,
        bootstrap=BootstrapConfig(resamples=300, seed=5),
    )

    comparison = result.comparison
    assert set(comparison.runs) == {"greedy", "sampled", "lora"}
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        q = lambda sql, *p: con.execute(sql, list(p)).fetchall()  # noqa: E731
        # all runs are on one dataset version, so compare_runs works on them too; the adapter is recorded
        assert q("SELECT count(DISTINCT dataset_version), count(DISTINCT model_fingerprint) FROM runs") == [(1, 2)]
        assert q(
            "SELECT count(*) FROM compare_runs(?, ?) WHERE scorer = 'completion_tokens'",
            comparison.runs["greedy"],
            comparison.runs["sampled"],
        ) == [(1,)]
        unique, errors, rejected = q("SELECT unique_requests, errors, rejected FROM runs LIMIT 1")[0]
        assert (errors, rejected) == (0, 2)  # the null and the over-long prompt: rejected before inference
        answered = unique - errors
        # per variant and scorer: n + unscored = the answers, CI around the mean
        for row in comparison.scores:
            if row["scorer"] in ("completion_tokens", "judge"):
                assert row["n"] + row["unscored"] == answered
            if row["n"] > 1 and row["stddev"]:
                assert row["ci95_low"] < row["mean"] < row["ci95_high"]
        assert {row["scorer"] for row in comparison.scores} >= {"completion_tokens", "chrf", "exact_match", "judge"}
        # logprobs were asked for in one variant only: only its answers have logprob scores, all negative or zero
        logprob_scores = {
            (r["variant"], r["scorer"]): r for r in comparison.scores if r["scorer"] in ("mean_logprob", "perplexity")
        }
        assert set(logprob_scores) == {("sampled", "mean_logprob"), ("sampled", "perplexity")}
        assert logprob_scores[("sampled", "mean_logprob")]["n"] == answered
        assert q("SELECT max(value) <= 0 FROM scores WHERE scorer = 'mean_logprob'") == [(True,)]
        # the judge's verdict is constrained: random weights, yet every answer gets a score from 1 to 10
        judged = q(
            "SELECT count(*), count(*) FILTER (WHERE label = ?), count(*) FILTER (WHERE value IS NOT NULL AND (value < 1 OR value > 10)) FROM scores WHERE scorer = 'judge'",
            UNPARSEABLE,
        )
        total, unparseable, out_of_range = judged[0]
        assert total == 3 * answered and unparseable == 0 and out_of_range == 0
        # win rates pair the variants on every request both scored; a length has no winner
        wins = {(r["variant_a"], r["variant_b"]): r for r in comparison.win_rates if r["scorer"] == "completion_tokens"}
        assert set(wins) == {(a, b) for a in comparison.runs for b in comparison.runs if a != b}
        assert {(r["direction"], r["pairs"], r["wins"], r["win_rate"]) for r in wins.values()} == {("none", answered, None, None)}
        values = score_values(con, comparison.comparison_id)
        check_win_rates_against_score_rows(comparison.win_rates, values)
        check_differences_against_score_rows(comparison.differences, values, list(comparison.runs))

    with open(result.chart_path, "rb") as chart:
        assert chart.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(result.chart_path.removesuffix(".png") + "-differences.png", "rb") as chart:
        assert chart.read(8) == b"\x89PNG\r\n\x1a\n"
    # the key is shared by every comparison of the session: this comparison's report is the one naming it
    (report,) = [a.data for a in asyncio.run(read_artifact("ab-comparison")) if comparison.comparison_id in a.data]
    assert "data:image/png;base64," in report and "| completion_tokens@1 | – (no winner) | greedy |" in report
    assert "## Findings" in report and "p < α = 0.1" in report and "| p (sign test) | p < 0.1 | after Holm |" in report
    # every difference is in the report with its p-value
    for row in comparison.differences:
        assert f"| {row['variant_a']} | {row['variant_b']} | {row['pairs']} |" in report
        assert f"| {row['p_value']:.3g} |" in report


def score_values(con, comparison_id: str) -> dict:
    """(variant, scorer, scorer_version) → {(custom_id, sample_index): value}, from the score rows themselves."""
    found = con.execute(
        """
        SELECT c.variant, s.scorer, s.scorer_version, s.direction, ro.custom_id, ro.sample_index, s.value
        FROM comparisons c
        JOIN run_outputs ro ON ro.run_id = c.run_id AND ro.duplicate_of IS NULL
        JOIN scores s ON s.output_id = ro.output_id
        WHERE c.comparison_id = ? AND s.value IS NOT NULL
        """,
        [comparison_id],
    ).fetchall()
    values: dict = {}
    for variant, scorer, version, direction, custom_id, sample, value in found:
        values.setdefault((variant, scorer, version), {"direction": direction, "values": {}})["values"][(custom_id, sample)] = (
            value
        )
    return values


def paired(values: dict, a: str, b: str, scorer: str, version: str) -> tuple[str, list[float], list[float]]:
    first, second = values[(a, scorer, version)], values[(b, scorer, version)]
    keys = sorted(set(first["values"]) & set(second["values"]))
    return first["direction"], [first["values"][k] for k in keys], [second["values"][k] for k in keys]


def check_win_rates_against_score_rows(win_rates: list[dict], values: dict) -> None:
    """Wins counted by each scorer's direction, ties half, Wilson interval: as the score rows say."""
    directed = [row for row in win_rates if row["direction"] != "none"]
    assert {row["scorer"] for row in directed} >= {"finish_reason", "empty_output", "refusal", "valid_json"}
    for row in directed:
        direction, a, b = paired(values, row["variant_a"], row["variant_b"], row["scorer"], row["scorer_version"])
        better = [(x > y) if direction == "higher" else (x < y) for x, y in zip(a, b)]
        worse = [(x < y) if direction == "higher" else (x > y) for x, y in zip(a, b)]
        ties = sum(x == y for x, y in zip(a, b))
        assert (row["pairs"], row["wins"], row["losses"], row["ties"]) == (len(a), sum(better), sum(worse), ties), row
        assert row["win_rate"] == pytest.approx((sum(better) + ties / 2) / len(a))
        assert (row["win_rate_ci95_low"], row["win_rate_ci95_high"]) == pytest.approx(
            wilson_interval(sum(better) + ties / 2, len(a))
        )


def check_differences_against_score_rows(differences: list[dict], values: dict, variants: list[str]) -> None:
    """One row per scorer and pair of variants (in the order given); means, counts, sign test and the
    bootstrap interval (the same pairs and seed) recomputed from the score rows."""
    expected_pairs = {(a, b) for i, a in enumerate(variants) for b in variants[i + 1 :]}
    assert {(row["variant_a"], row["variant_b"]) for row in differences} == expected_pairs
    assert {row["scorer"] for row in differences} >= {"completion_tokens", "finish_reason", "refusal", "distinct_2"}
    for row in differences:
        direction, a, b = paired(values, row["variant_a"], row["variant_b"], row["scorer"], row["scorer_version"])
        recomputed = paired_difference(a, b, BootstrapConfig(resamples=row["resamples"], seed=row["seed"]))
        assert row["direction"] == direction and (row["resamples"], row["seed"]) == (300, 5)
        assert (row["pairs"], row["b_higher"], row["a_higher"]) == (recomputed.pairs, recomputed.b_higher, recomputed.a_higher)
        assert (row["mean_a"], row["mean_b"], row["mean_diff"]) == pytest.approx(
            (sum(a) / len(a), sum(b) / len(b), sum(b) / len(b) - sum(a) / len(a))
        )
        assert row["p_value"] == pytest.approx(sign_test_p_value(recomputed.b_higher, recomputed.a_higher))
        assert (row["diff_ci95_low"], row["diff_ci95_high"]) == pytest.approx(
            (recomputed.diff_ci95_low, recomputed.diff_ci95_high)
        )
        assert row["diff_ci95_low"] <= row["mean_diff"] + 1e-12 and row["mean_diff"] <= row["diff_ci95_high"] + 1e-12
