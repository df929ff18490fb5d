"""Judging stored runs (flows/judge_runs.py) as plain functions: the judge's requests built from the
runs' answers (pairwise: each pair shown in both orders), the judge's answers read back as verdicts,
and the judgement they add up to — wins, ties, position bias, the win rate with its Wilson interval
and a sign test.

Pairwise, a pair's verdict counts only when both orders agree on the winner; a pair whose verdict
flips with the order is inconsistent, and counts as a tie. The share of inconsistent pairs is the
judge's position bias.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import fmean
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel

from tasks import storage
from tasks.config import DatasetSpec, SpecError, ValidationConfig
from tasks.keys import content_hash, sampling_hash
from tasks.scoring.compare import sign_test_p_value, wilson_interval
from tasks.scoring.judge import UNPARSEABLE, JudgeConfig, JudgeKind, judge_error, judge_version, parse_verdict, user_prompt

# Which answer a judge request showed first (pairwise: "ab" shows run a's answer as A) or graded (absolute).
Position = Literal["ab", "ba", "a", "b"]
# A pairwise label, read in each order as the run whose answer it names.
WINNERS = {"ab": {"A": "a", "B": "b", "tie": "tie"}, "ba": {"A": "b", "B": "a", "tie": "tie"}}
NOT_ANSWERED = "rejected"  # the judge request never reached the model (e.g. longer than its context)

JUDGE_REQUEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the judge request's custom_id in the judge run
        ("prompt", pa.string()),
        ("custom_id", pa.string()),  # the judged request
        ("sample_index", pa.int32()),
        ("position", pa.string()),
        ("output_id_a", pa.string()),
        ("output_id_b", pa.string()),  # null: against the reference, or one run judged alone
    ]
)
VERDICT_SCHEMA = pa.schema(
    [
        ("judgement_id", pa.string()),
        ("custom_id", pa.string()),
        ("sample_index", pa.int32()),
        ("position", pa.string()),
        ("output_id_a", pa.string()),
        ("output_id_b", pa.string()),
        ("judge_custom_id", pa.string()),
        ("judge_output_id", pa.string()),
        ("verdict", pa.string()),  # the label as the judge gave it: A, B, tie, or 1-10
        ("winner", pa.string()),  # pairwise: a, b or tie, whichever order it was shown in
        ("score", pa.float64()),  # absolute: 1-10
        ("reason", pa.string()),
        ("error", pa.string()),  # the judge request's error code, `unparseable` or `rejected`; null with a verdict
    ]
)


# An absolute judge's grades as rows of `scores` (pairwise verdicts are about two answers: no score of either).
JUDGE_SCORE_SCHEMA = pa.schema(
    [
        ("output_id", pa.string()),
        ("scorer", pa.string()),
        ("scorer_version", pa.string()),
        ("value", pa.float64()),
        ("label", pa.string()),
        ("run_id", pa.string()),
        ("direction", pa.string()),
    ]
)


class JudgedRuns(BaseModel):
    """What is judged: run a's answers against run b's, or against its requests' reference answers (pairwise),
    or run a's (and run b's) answers each alone (absolute)."""

    run_a: str
    run_b: str | None = None
    reference: bool = False

    @property
    def against(self) -> str:
        return "reference" if self.reference else "run" if self.run_b else "none"


def check_judged_runs(runs: JudgedRuns, kind: JudgeKind) -> None:
    if runs.run_b is not None and runs.run_b == runs.run_a:
        raise SpecError(f"run_b: the same run as run_a ({runs.run_a}); judge two different runs")
    if kind == "pairwise" and (runs.run_b is None) == (not runs.reference):
        raise SpecError("a pairwise judge compares run_a with either run_b or the reference answers (reference=True): give one")
    if kind == "absolute" and runs.reference:
        raise SpecError("reference: the absolute judge grades each answer alone; compare with the reference pairwise")


class JudgeRequests(BaseModel):
    """The judge's requests as a dataset the inference path runs (a Parquet file named by its content), and what they judge."""

    dataset: DatasetSpec
    path: str
    runs: JudgedRuns
    pairs: int  # pairs judged (absolute with one run: answers)
    requests: int


def judge_requests(answers: pa.Table, runs: JudgedRuns, judge: JudgeConfig) -> pa.Table:
    """One judge request per answer (absolute), or two per pair of answers, one in each order (pairwise).
    `answers` are the rows of `store.queries.judged_answers`; pairs without a reference are left out."""
    rows = []
    for row in answers.to_pylist():
        question, reference = user_prompt(row), row["reference"]
        second = reference if runs.reference else row["text_b"]
        if judge.kind == "pairwise" and second is None:
            continue
        if judge.kind == "pairwise":
            shown = [("ab", row["text_a"], second), ("ba", second, row["text_a"])]
        else:
            shown = [("a", row["text_a"], None)] + ([("b", row["text_b"], None)] if row["output_id_b"] else [])
        for position, first, other in shown:
            rows.append(
                {
                    "id": f"{position}:{row['sample_index']}:{row['custom_id']}",
                    "prompt": judge.prompt(question, first, other, reference),
                    "custom_id": row["custom_id"],
                    "sample_index": row["sample_index"],
                    "position": position,
                    "output_id_a": row["output_id_a"],
                    "output_id_b": row["output_id_b"],
                }
            )
    if not rows:
        what = "reference answers" if runs.reference else f"answers of run {runs.run_b}" if runs.run_b else "answers"
        raise SpecError(f"run {runs.run_a}: no answered requests to judge against its {what} (paired by custom_id)")
    return pa.Table.from_pylist(rows, schema=JUDGE_REQUEST_SCHEMA)


def judge_dataset(requests: pa.Table, storage_folder: str, runs: JudgedRuns, judge: JudgeConfig) -> tuple[DatasetSpec, str]:
    """The dataset spec of the judge's requests and the file they go in: named by their content, so the
    same judging again is the same input (its preparation and its answers are reused)."""
    key = content_hash(requests.to_pydict())
    path = storage.join(storage_folder, f"{key}.parquet")
    name = f"judge-{judge.kind}-{content_hash(runs.model_dump())[:8]}"
    # every judge request is kept: one the model cannot take becomes an error row, then a missing verdict
    validation = ValidationConfig(max_rejected_share=1.0)
    spec = DatasetSpec(name=name, source=path, format="parquet", id_column="id", prompt_column="prompt", validation=validation)
    return spec, path


def judgement_id(runs: JudgedRuns, judge: JudgeConfig, dataset_version: str, model_fingerprint: str) -> str:
    """The judgement's key: what was judged (the judge requests' content, which holds the rubric and the
    answers) and by what judge (its code version, its model, and its sampling with the verdict's constraint):
    a judge whose verdicts are read another way makes another judgement, beside the first."""
    sampling = sampling_hash(judge.judge_sampling())
    return content_hash(
        {
            "runs": runs.model_dump(),
            "kind": judge.kind,
            "requests": dataset_version,
            "model": model_fingerprint,
            "sampling": sampling,
            "judge": judge_version(judge, model_fingerprint),
        }
    )


def read_verdict(answer: dict | None, position: str, judge: JudgeConfig) -> dict:
    """A judge's answer to one request as a verdict: its label, the winner (pairwise) or score (absolute), the reason;
    or the error that stands in for it."""
    empty = {"judge_output_id": None, "verdict": None, "winner": None, "score": None, "reason": None}
    if answer is None:
        return {**empty, "error": NOT_ANSWERED}
    if answer["error_code"] is not None:
        return {**empty, "judge_output_id": answer["output_id"], "error": answer["error_code"]}
    parsed = parse_verdict(answer["text"], judge.kind, judge.verdict)
    if parsed is None:
        return {**empty, "judge_output_id": answer["output_id"], "error": UNPARSEABLE}
    label, reason = parsed
    return {
        "judge_output_id": answer["output_id"],
        "verdict": label,
        "winner": WINNERS[position][label] if judge.kind == "pairwise" else None,
        "score": float(label) if judge.kind == "absolute" else None,
        "reason": reason,
        "error": None,
    }


def verdict_table(judgement: str, requests: pa.Table, answers: pa.Table, judge: JudgeConfig) -> pa.Table:
    """A verdict row per judge request; `answers` are the judge run's (custom_id, output_id, text, error_code)."""
    by_id = {answer["custom_id"]: answer for answer in answers.to_pylist()}
    rows = []
    for request in requests.to_pylist():
        judged = {name: request[name] for name in ("custom_id", "sample_index", "position", "output_id_a", "output_id_b")}
        verdict = read_verdict(by_id.get(request["id"]), request["position"], judge)
        rows.append({"judgement_id": judgement, **judged, "judge_custom_id": request["id"], **verdict})
    return pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA)


def pair_outcome(verdicts: dict[str, dict], kind: JudgeKind) -> tuple[str | None, bool]:
    """(a, b, tie or None when a verdict is missing; whether the two orders disagreed) of one pair's verdicts."""
    if kind == "pairwise":
        winners = [verdicts.get(position, {}).get("winner") for position in ("ab", "ba")]
        if None in winners:
            return None, False
        return (winners[0], False) if winners[0] == winners[1] else ("tie", True)
    scores = [verdicts.get(position, {}).get("score") for position in ("a", "b")]
    if None in scores:
        return None, False
    return ("a" if scores[0] > scores[1] else "b" if scores[1] > scores[0] else "tie"), False


def summarize_judgement(verdicts: list[dict], kind: JudgeKind, paired: bool) -> dict:
    """The judgement's numbers from its verdict rows (the columns of `judgements` they decide).

    `paired`: two answers per request were judged (pairwise always; absolute with two runs)."""
    pairs: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in verdicts:
        pairs[(row["custom_id"], row["sample_index"])][row["position"]] = row
    outcomes = [pair_outcome(pair, kind) for pair in pairs.values()] if paired else []
    judged = [(outcome, flipped) for outcome, flipped in outcomes if outcome is not None]
    wins = {side: sum(outcome == side for outcome, _ in judged) for side in ("a", "b", "tie")}
    inconsistent = sum(flipped for _, flipped in judged)
    decisive = [row["verdict"] for row in verdicts if row["verdict"] in ("A", "B")]
    scores = {side: [row["score"] for row in verdicts if row["position"] == side and row["score"] is not None] for side in "ab"}
    win_rate = (wins["a"] + wins["tie"] / 2) / len(judged) if judged else None
    low, high = wilson_interval(wins["a"] + wins["tie"] / 2, len(judged)) if judged else (None, None)
    return {
        "requests": len(verdicts),
        "pairs": len(judged),
        "unjudged": len(outcomes) - len(judged),
        "unparseable": sum(row["error"] == UNPARSEABLE for row in verdicts),
        "judge_errors": sum(row["error"] not in (None, UNPARSEABLE) for row in verdicts),
        "a_wins": wins["a"],
        "b_wins": wins["b"],
        "ties": wins["tie"],
        "inconsistent": inconsistent if kind == "pairwise" else None,
        "position_bias": inconsistent / len(judged) if kind == "pairwise" and judged else None,
        "first_position_rate": decisive.count("A") / len(decisive) if decisive else None,
        "mean_score_a": fmean(scores["a"]) if scores["a"] else None,
        "mean_score_b": fmean(scores["b"]) if scores["b"] else None,
        "win_rate": win_rate,
        "win_rate_ci95_low": low,
        "win_rate_ci95_high": high,
        "p_value": sign_test_p_value(wins["a"], wins["b"]) if judged else None,
    }


def judgement_record(
    key: str, runs: JudgedRuns, judge: JudgeConfig, judge_run_id: str, model_fingerprint: str, verdicts: pa.Table
) -> dict:
    """The judgement's row of `judgements`: what was judged, by which judge run, and its numbers."""
    return {
        "judgement_id": key,
        "kind": judge.kind,
        "run_a": runs.run_a,
        "run_b": runs.run_b,
        "against": runs.against,
        "judge_run_id": judge_run_id,
        "judge_model": judge.model.model,
        "judge_model_fingerprint": model_fingerprint,
        "judge_sampling_hash": sampling_hash(judge.judge_sampling()),
        "verdict_format": judge.verdict,
        "rubric_hash": judge.rubric_hash(),
        "judge_version": judge_version(judge, model_fingerprint),
        **summarize_judgement(verdicts.to_pylist(), judge.kind, paired=runs.against != "none"),
    }


def verdict_scores(verdicts: pa.Table, runs: JudgedRuns, scorer_version: str) -> pa.Table:
    """An absolute judgement's grades as score rows of the answers graded (scorer `judge`, higher is better),
    as the `judge` scorer writes them: the reason as the label, or, with no grade, why."""
    rows = []
    for row in verdicts.to_pylist():
        graded_b = row["position"] == "b"
        rows.append(
            {
                "output_id": row["output_id_b"] if graded_b else row["output_id_a"],
                "scorer": "judge",
                "scorer_version": scorer_version,
                "value": row["score"],
                "label": row["reason"] if row["error"] is None else judge_error(row["error"]),
                "run_id": runs.run_b if graded_b else runs.run_a,
                "direction": "higher",
            }
        )
    return pa.Table.from_pylist(rows, schema=JUDGE_SCORE_SCHEMA)
