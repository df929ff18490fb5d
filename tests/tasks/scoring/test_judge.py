"""The LLM judge: its score parser, and a real judge model (the tiny one, through real vLLM)."""

import pytest

from tasks.scoring.judge import UNPARSEABLE, judge_scorer, parse_judge_score


def row(text: str) -> dict:
    return {"request_key": "k", "sample_index": 0, "text": text, "prompt": "q", "messages": None, "reference": None}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Score: 7", 7.0),
        ("score 10/10, great", 10.0),
        ("Rating: **8**", 8.0),
        ("I would give it 6/10.", 6.0),
        ("9", 9.0),
        ("The answer is fine. Score = 3", 3.0),
        ("Score: 11", None),
        ("7.5/10", None),
        ("It has 3 parts and is good", None),
        ("", None),
        (None, None),
    ],
)
def test_judge_parser(answer, expected):
    assert parse_judge_score(answer) == expected


@pytest.mark.slow
def test_judge_runs_the_second_model_and_records_unparseable_answers_as_such(tiny_model):
    judge = judge_scorer(tiny_model, sampling={"max_tokens": 8})
    rows = [row("Paris is the capital of France."), row("blue"), row("")]
    results = judge.score(rows)
    assert len(results) == 3
    for value, label in results:
        # random weights: almost always gibberish; whatever it is, it is a parsed 1-10 or labelled, never 0
        assert (value is None and label == UNPARSEABLE) or (1 <= value <= 10 and label is None)
    assert judge.score(rows) == results  # greedy: the same verdicts again
    other = judge_scorer(tiny_model, rubric="Grade {{ response }} from 1 to 10.", sampling={"max_tokens": 8})
    assert other.version != judge.version  # the rubric is part of the version
