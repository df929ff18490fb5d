import asyncio

import duckdb
import pytest
from prefect.client.orchestration import get_client

from flows.compare_runs import compare_runs
from tasks.config import LoraAdapter, SamplingConfig, ShardingConfig
from tasks.scoring.compare import Variant
from tasks.scoring.judge import UNPARSEABLE
from tasks.scoring.registry import DEFAULT_SCORERS
from tasks.scoring.scorers import ScorerSpec


async def read_artifact(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.mark.slow
def test_sampling_and_lora_variants_are_compared_with_cis_win_rates_and_a_chart(
    prefect_harness, tiny_model, tiny_lora_dir, reference_slice, store
):
    judge = ScorerSpec(name="judge", options={"model": tiny_model.model_dump(), "sampling": {"max_tokens": 8}})

    result = compare_runs(
        variants=[
            Variant(name="greedy"),
            Variant(name="sampled", sampling=SamplingConfig(temperature=1.0, seed=7, max_tokens=8, logprobs=0)),
            Variant(
                name="lora", model=tiny_model.model_copy(update={"lora_adapter": LoraAdapter(name="a", path=str(tiny_lora_dir))})
            ),
        ],
        dataset=reference_slice,
        model=tiny_model,
        sampling=SamplingConfig(max_tokens=8),
        sharding=ShardingConfig(shard_size=16),
        store=store,
        scorers=[*DEFAULT_SCORERS, judge],
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
        # the judge's gibberish answers are recorded as unparseable, never as a score of 0
        judged = q(
            "SELECT count(*), count(*) FILTER (WHERE label = ?), count(*) FILTER (WHERE value IS NOT NULL AND (value < 1 OR value > 10)) FROM scores WHERE scorer = 'judge'",
            UNPARSEABLE,
        )
        total, unparseable, out_of_range = judged[0]
        assert total == 3 * answered and unparseable > 0 and out_of_range == 0
        # win rates pair the variants on every request both scored
        wins = {(r["variant_a"], r["variant_b"]): r for r in comparison.win_rates if r["scorer"] == "completion_tokens"}
        assert set(wins) == {(a, b) for a in comparison.runs for b in comparison.runs if a != b}
        a, b = wins[("greedy", "sampled")], wins[("sampled", "greedy")]
        assert a["pairs"] == answered and (a["wins"], a["losses"], a["ties"]) == (b["losses"], b["wins"], b["ties"])
        assert a["win_rate"] + b["win_rate"] == pytest.approx(1.0)

    with open(result.chart_path, "rb") as chart:
        assert chart.read(8) == b"\x89PNG\r\n\x1a\n"
    (artifact, *_) = asyncio.run(read_artifact("ab-comparison"))
    assert "data:image/png;base64," in artifact.data and "| completion_tokens@1 | greedy |" in artifact.data
