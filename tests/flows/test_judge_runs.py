"""judge_runs on the tiny model through real vLLM: the pairwise judge is sent every pair in both orders,
every verdict parses (structured output), a judgement's numbers are its verdict rows', and the same
judging again through `vbf judge` sends the engine nothing."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from flows.batch_inference import batch_inference
from flows.judge_runs import judge_runs
from tasks.config import SamplingConfig
from tasks.scoring.compare import sign_test_p_value, wilson_interval
from tasks.scoring.judge import JudgeConfig, judge_scorer

ROOT = Path(__file__).resolve().parents[2]
JUDGEMENT_NUMBERS = ("pairs", "a_wins", "b_wins", "ties", "inconsistent", "position_bias", "first_position_rate")


def verdict_rows(query, store, judgement_id: str) -> list[dict]:
    columns = ["custom_id", "sample_index", "position", "verdict", "winner", "score", "reason", "error"]
    columns += ["output_id_a", "output_id_b", "judge_custom_id"]
    found = query(
        store, f"SELECT {', '.join(columns)} FROM judge_verdicts WHERE judgement_id = ? ORDER BY judge_custom_id", [judgement_id]
    )
    return [dict(zip(columns, row)) for row in found]


def judgement_row(query, store, judgement_id: str) -> dict:
    found = query(store, "SELECT * EXCLUDE (created_at) FROM judgements WHERE judgement_id = ?", [judgement_id])
    names = [name for (name,) in query(store, "SELECT column_name FROM (DESCRIBE judgements) WHERE column_name <> 'created_at'")]
    (row,) = found
    return dict(zip(names, row))


def recomputed(verdicts: list[dict]) -> dict:
    """A pairwise judgement's numbers from its verdict rows: a pair counts only when both orders name the
    same run; otherwise it is inconsistent and a tie."""
    pairs = defaultdict(dict)
    for row in verdicts:
        pairs[(row["custom_id"], row["sample_index"])][row["position"]] = row["winner"]
    outcomes = [(p["ab"] if p["ab"] == p["ba"] else "tie", p["ab"] != p["ba"]) for p in pairs.values()]
    decisive = [row["verdict"] for row in verdicts if row["verdict"] != "tie"]
    a, b = sum(o == "a" for o, _ in outcomes), sum(o == "b" for o, _ in outcomes)
    return {
        "pairs": len(outcomes),
        "a_wins": a,
        "b_wins": b,
        "ties": len(outcomes) - a - b,
        "inconsistent": sum(flipped for _, flipped in outcomes),
        "position_bias": sum(flipped for _, flipped in outcomes) / len(outcomes),
        "first_position_rate": decisive.count("A") / len(decisive) if decisive else None,
    }


def check_against_verdicts(judgement: dict, verdicts: list[dict]) -> None:
    expected = recomputed(verdicts)
    assert {name: judgement[name] for name in JUDGEMENT_NUMBERS} == pytest.approx(expected)
    half = expected["a_wins"] + expected["ties"] / 2
    assert judgement["win_rate"] == pytest.approx(half / expected["pairs"])
    assert (judgement["win_rate_ci95_low"], judgement["win_rate_ci95_high"]) == pytest.approx(
        wilson_interval(half, expected["pairs"])
    )
    assert judgement["p_value"] == pytest.approx(sign_test_p_value(expected["a_wins"], expected["b_wins"]))


@pytest.mark.slow
def test_judges_over_stored_runs_in_both_orders_with_verdicts_that_parse_and_numbers_from_them(
    prefect_harness, tiny_model, tiny_model_dir, sample_spec, store, query, tmp_path
):
    dataset = sample_spec(12, reference_column="category")  # 11 unique requests; the category as a reference answer
    settings = {"greedy": SamplingConfig(max_tokens=8), "sampled": SamplingConfig(temperature=1.0, seed=7, max_tokens=8)}
    runs = {
        name: batch_inference(dataset=dataset, model=tiny_model, sampling=sampling, store=store, scorers=[]).run_id
        for name, sampling in settings.items()
    }
    judge = JudgeConfig(model=tiny_model)

    pairwise = judge_runs(run_a=runs["greedy"], run_b=runs["sampled"], judge=judge, store=store)

    key = pairwise.judgement.judgement_id
    verdicts = verdict_rows(query, store, key)
    judgement = judgement_row(query, store, key)
    assert judgement == pairwise.judgement.model_dump()
    assert len(verdicts) == 22 and judgement["requests"] == 22 and judgement["pairs"] == 11
    # constrained output: every verdict parses, and a label in each order names a run by where it was shown
    assert (judgement["unparseable"], judgement["judge_errors"], judgement["unjudged"]) == (0, 0, 0)
    assert {row["error"] for row in verdicts} == {None} and {row["verdict"] for row in verdicts} <= {"A", "B", "tie"}
    for row in verdicts:
        shown_first = "a" if row["position"] == "ab" else "b"
        named = {"A": shown_first, "B": {"a": "b", "b": "a"}[shown_first], "tie": "tie"}[row["verdict"]]
        assert row["winner"] == named
    # both orders were sent: the judge run's stored prompts show a's and b's answers swapped
    answers = dict(query(store, "SELECT output_id, text FROM outputs"))
    questions = dict(
        query(
            store,
            "SELECT custom_id, prompt FROM run_outputs JOIN requests USING (dataset_version, custom_id) WHERE run_id = ?",
            [runs["greedy"]],
        )
    )
    sent = dict(
        query(
            store,
            "SELECT custom_id, prompt FROM requests WHERE dataset_version = (SELECT dataset_version FROM runs WHERE run_id = ?)",
            [judgement["judge_run_id"]],
        )
    )
    assert len(sent) == 22 and {row["position"] for row in verdicts} == {"ab", "ba"}
    for row in verdicts:
        a, b = answers[row["output_id_a"]], answers[row["output_id_b"]]
        first, second = (a, b) if row["position"] == "ab" else (b, a)
        assert sent[row["judge_custom_id"]] == judge.prompt(questions[row["custom_id"]], first, second, None)
    assert sorted(
        query(store, "SELECT engine_requests, cached_shards FROM runs WHERE run_id = ?", [judgement["judge_run_id"]])
    ) == [(22, 0)]
    check_against_verdicts(judgement, verdicts)

    # against the reference answers, with a JSON verdict and its reason: still every verdict parses
    with_reasons = JudgeConfig(model=tiny_model, verdict="json")
    reference = judge_runs(run_a=runs["greedy"], reference=True, judge=with_reasons, store=store).judgement
    reference_verdicts = verdict_rows(query, store, reference.judgement_id)
    assert reference.against == "reference" and reference.run_b is None and reference.pairs == 11
    assert (reference.unparseable, reference.judge_errors) == (0, 0)
    assert all(row["error"] is None and isinstance(row["reason"], str) for row in reference_verdicts)
    assert {row["output_id_b"] for row in reference_verdicts} == {None}
    check_against_verdicts(judgement_row(query, store, reference.judgement_id), reference_verdicts)

    # the absolute judge grades each answer alone, 1-10; wins by the higher score
    absolute = judge_runs(
        run_a=runs["greedy"], run_b=runs["sampled"], judge=JudgeConfig(model=tiny_model, kind="absolute"), store=store
    ).judgement
    graded = verdict_rows(query, store, absolute.judgement_id)
    assert len(graded) == 22 and absolute.unparseable == 0 and {row["position"] for row in graded} == {"a", "b"}
    assert all(1 <= row["score"] <= 10 and row["score"] == float(row["verdict"]) for row in graded)
    scores = defaultdict(dict)
    for row in graded:
        scores[row["custom_id"]][row["position"]] = row["score"]
    assert (absolute.a_wins, absolute.b_wins) == (
        sum(s["a"] > s["b"] for s in scores.values()),
        sum(s["b"] > s["a"] for s in scores.values()),
    )
    assert absolute.mean_score_a == pytest.approx(sum(s["a"] for s in scores.values()) / 11)
    assert absolute.position_bias is None
    # each grade is a score of the answer graded, under the `judge` scorer's own version for this judge, so
    # what reads scores sees it: run_scores (run_summary), the compare_runs macro, a review's `scorer: judge`
    version = judge_scorer(tiny_model).version
    assert absolute.judge_version == version and pairwise.judgement.judge_version.split("+")[0] == version.split("+")[0]
    assert len({pairwise.judgement.judge_version, reference.judge_version, version}) == 3  # each judge its own
    graded_scores = query(
        store, "SELECT output_id, run_id, value, label, direction, scorer_version FROM scores WHERE scorer = 'judge'"
    )
    run_of = {"a": runs["greedy"], "b": runs["sampled"]}
    assert sorted(graded_scores) == sorted(
        (row["output_id_" + row["position"]], run_of[row["position"]], row["score"], None, "higher", version) for row in graded
    )
    means = dict(query(store, "SELECT run_id, mean FROM run_scores WHERE scorer = 'judge'"))
    assert means == pytest.approx({runs["greedy"]: absolute.mean_score_a, runs["sampled"]: absolute.mean_score_b})
    assert query(
        store, "SELECT pairs, mean_a, mean_b FROM compare_runs(?, ?) WHERE scorer = 'judge'", [runs["greedy"], runs["sampled"]]
    ) == [(11, pytest.approx(absolute.mean_score_a), pytest.approx(absolute.mean_score_b))]
    # judged again: the same rows, not twice as many
    judge_runs(run_a=runs["greedy"], run_b=runs["sampled"], judge=JudgeConfig(model=tiny_model, kind="absolute"), store=store)
    assert sorted(query(store, "SELECT output_id, run_id, value, label, direction, scorer_version FROM scores")) == sorted(
        graded_scores
    )

    # the same pairwise judging again, from the command line: nothing is sent, the judgement is the same
    flags = ["--model", str(tiny_model_dir), "--max-model-len", "256", "--gpu-memory-utilization", "0.1"]
    flags += ["--duckdb", store.duckdb_path, "--storage", store.storage, "--summary-json", str(tmp_path / "again.json")]
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "vbf"), "judge", runs["greedy"], runs["sampled"], *flags],
        cwd=ROOT,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["judge_run"]["engine_requests"] == 0 and again["judgement"]["judgement_id"] == key
    assert f"pairwise judgement {key}" in completed.stdout
    assert query(store, "SELECT engine_requests FROM runs WHERE run_id = ?", [again["judge_run"]["run_id"]]) == [(0,)]
    assert verdict_rows(query, store, key) == verdicts and query(store, "SELECT count(*) FROM judgements") == [(3,)]
