"""The LLM judges: their verdicts' constraints and parser, a judgement's numbers from its verdicts, the
configuration mistakes named, and the absolute judge as a scorer on a real judge model (the tiny one,
through real vLLM): with structured output every verdict parses."""

import re

import pyarrow as pa
import pytest

from tasks.config import ModelConfig, SpecError
from tasks.keys import model_fingerprint
from tasks.scoring import judge as judge_module
from tasks.scoring.judge import (
    LABELS,
    UNPARSEABLE,
    JudgeConfig,
    judge_scorer,
    parse_verdict,
    verdict_constraint,
)
from tasks.scoring.judgement import (
    VERDICT_SCHEMA,
    JudgedRuns,
    check_judged_runs,
    judge_requests,
    judgement_id,
    judgement_record,
    summarize_judgement,
)


def row(text: str) -> dict:
    return {"request_key": "k", "sample_index": 0, "text": text, "prompt": "q", "messages": None, "reference": None}


@pytest.mark.parametrize(
    "answer, kind, verdict, expected",
    [
        ("tie", "pairwise", "choice", ("tie", None)),
        (" B\n", "pairwise", "choice", ("B", None)),
        ("C", "pairwise", "choice", None),
        ("10", "absolute", "choice", ("10", None)),
        ("Score: 7", "absolute", "choice", None),
        ('{"verdict": "A", "reason": "more precise"}', "pairwise", "json", ("A", "more precise")),
        ('{"score": 10, "reason": "cut sho', "absolute", "json", ("10", "cut sho")),  # max_tokens cut the reason
        ('{"score": 1', "absolute", "json", None),  # 1 or 10: the verdict itself was cut
        ('{"verdict": "maybe", "reason": ""}', "pairwise", "json", None),
        (None, "pairwise", "choice", None),
    ],
)
def test_a_verdict_is_read_from_the_judges_answer(answer, kind, verdict, expected):
    assert parse_verdict(answer, kind, verdict) == expected


def test_the_json_verdicts_regex_holds_each_label_and_a_bounded_reason():
    for kind in ("pairwise", "absolute"):
        pattern = verdict_constraint(kind, "json").regex
        key = "verdict" if kind == "pairwise" else "score"
        for label in LABELS[kind]:
            value = f'"{label}"' if kind == "pairwise" else label
            assert re.fullmatch(pattern, f'{{"{key}": {value}, "reason": "fine, short"}}')
        assert not re.fullmatch(pattern, f'{{"{key}":  {value}, "reason": ""}}')  # no room for whitespace
        assert not re.fullmatch(pattern, f'{{"{key}": {value}, "reason": "{"x" * 201}"}}')
    assert verdict_constraint("pairwise", "choice").choice == ["A", "B", "tie"]


def test_configuration_mistakes_are_named_before_anything_runs():
    with pytest.raises(ValueError, match="sampling.max_tokens: a json verdict needs at least 24"):
        JudgeConfig(verdict="json", sampling={"max_tokens": 8})
    with pytest.raises(ValueError, match="sampling.structured: the judge constrains its verdict itself"):
        JudgeConfig(sampling={"structured": {"regex": "x"}})
    with pytest.raises(ValueError, match="rubric: 'response' is undefined; it may use .* answer_a, answer_b"):
        JudgeConfig(rubric="Is {{ response }} good?")
    with pytest.raises(SpecError, match="'my-judge': the judge scorer takes a model's configuration, not a saved block"):
        judge_scorer("my-judge")  # judge_runs loads a block of that name; a scorer's options are checked without one
    with pytest.raises(SpecError, match="either run_b or the reference"):
        check_judged_runs(JudgedRuns(run_a="r1"), "pairwise")
    with pytest.raises(SpecError, match="the same run as run_a"):
        check_judged_runs(JudgedRuns(run_a="r1", run_b="r1"), "absolute")
    nothing = pa.table({"custom_id": ["c"], "sample_index": [0], "prompt": ["q"], "messages": [None], "reference": [None]})
    nothing = nothing.append_column("output_id_a", pa.array(["o"])).append_column("text_a", pa.array(["t"]))
    nothing = nothing.append_column("output_id_b", pa.array([None], pa.string())).append_column(
        "text_b", pa.array([None], pa.string())
    )
    with pytest.raises(SpecError, match="run r1: no answered requests to judge against its reference answers"):
        judge_requests(nothing, JudgedRuns(run_a="r1", reference=True), JudgeConfig())


def test_a_pair_whose_verdict_flips_with_the_order_is_a_tie_and_counts_as_position_bias():
    def verdicts(custom_id: str, ab: str, ba: str) -> list[dict]:
        winner = {"ab": {"A": "a", "B": "b", "tie": "tie"}, "ba": {"A": "b", "B": "a", "tie": "tie"}}
        return [
            {
                "custom_id": custom_id,
                "sample_index": 0,
                "position": p,
                "verdict": v,
                "winner": winner[p][v],
                "score": None,
                "error": None,
            }
            for p, v in (("ab", ab), ("ba", ba))
        ]

    rows = verdicts("1", "A", "B") + verdicts("2", "A", "A") + verdicts("3", "B", "A") + verdicts("4", "tie", "tie")
    numbers = summarize_judgement(rows, "pairwise", paired=True)
    # pair 1: a both times; pair 2: A both times = a, then b: flipped; pair 3: b both times; pair 4: a tie
    assert (numbers["a_wins"], numbers["b_wins"], numbers["ties"], numbers["inconsistent"]) == (1, 1, 2, 1)
    assert numbers["position_bias"] == 0.25 and numbers["win_rate"] == 0.5
    assert numbers["first_position_rate"] == pytest.approx(4 / 6)
    rows[0] |= {"verdict": None, "winner": None, "error": UNPARSEABLE}
    assert summarize_judgement(rows, "pairwise", paired=True)["unjudged"] == 1


def test_a_judgement_records_its_judges_version_and_a_changed_judge_makes_another(tiny_model_dir, monkeypatch):
    model = ModelConfig(model=str(tiny_model_dir))
    judge, fingerprint, runs = JudgeConfig(model=model, kind="absolute"), model_fingerprint(model), JudgedRuns(run_a="r1")

    def recorded() -> dict:
        key = judgement_id(runs, judge, "dv1", fingerprint)
        return judgement_record(key, runs, judge, "judge-run", fingerprint, VERDICT_SCHEMA.empty_table())

    first = recorded()
    # the version the `judge` scorer writes its scores under, for the same judge
    assert first["judge_version"] == judge_scorer(model).version
    monkeypatch.setattr(judge_module, "JUDGE_VERSION", "3")  # as a change of the verdict parser would bump it
    changed = recorded()
    assert changed["judge_version"].startswith("3+") and changed["judge_version"] != first["judge_version"]
    assert changed["judgement_id"] != first["judgement_id"]  # beside the earlier judgement, not in its place
    monkeypatch.undo()
    judge = JudgeConfig(model=model, kind="absolute", rubric="Grade {{ response }}. {{ reply_format }}")
    assert recorded()["judge_version"] not in (first["judge_version"], changed["judge_version"])


@pytest.mark.slow
def test_the_absolute_judge_scorer_gives_a_parsed_score_for_every_answer(tiny_model):
    rows = [row("Paris is the capital of France."), row("blue"), row("")]
    judge = judge_scorer(tiny_model, sampling={"max_tokens": 8})
    results = judge.score(rows)
    # random weights, but a constrained verdict: always a score from 1 to 10
    assert len(results) == 3 and all(1 <= value <= 10 and label is None for value, label in results)
    assert judge.score(rows) == results  # greedy: the same verdicts again
    with_reasons = judge_scorer(tiny_model, verdict="json", sampling={"max_tokens": 32}).score(rows)
    assert all(1 <= value <= 10 and isinstance(reason, str) for value, reason in with_reasons)  # the reason is the label
    other = judge_scorer(tiny_model, rubric="Grade {{ response }} from 1 to 10.", sampling={"max_tokens": 8})
    assert other.version != judge.version and judge.version.startswith("2+")  # the rubric is part of the version
