import math

import pyarrow as pa
import pytest

from tasks.config import SpecError
from tasks.engines.base import OUTPUT_SCHEMA
from tasks.scoring.registry import DEFAULT_SCORERS, resolve_scorer, resolve_scorers, score_outputs, score_rows
from tasks.scoring.scorers import ScorerSpec


def row(text, finish_reason="stop", completion_tokens=2, reference=None, **extra) -> dict:
    return {
        "request_key": "k",
        "sample_index": 0,
        "text": text,
        "finish_reason": finish_reason,
        "prompt_tokens": 5,
        "completion_tokens": completion_tokens,
        "error_code": None,
        "error": None,
        "prompt": "q",
        "messages": None,
        "reference": reference,
        **extra,
    }


def score(name_or_spec, output: dict):
    scorer = resolve_scorer(name_or_spec)
    return scorer.score([output])[0]


def test_basic_scores_per_output_and_none_for_errors():
    outputs = pa.Table.from_pylist(
        [
            {
                "request_key": "a",
                "sample_index": 0,
                "text": "hi there",
                "finish_reason": "stop",
                "prompt_tokens": 5,
                "completion_tokens": 2,
                "error_code": None,
                "error": None,
            },
            {
                "request_key": "b",
                "sample_index": 0,
                "text": "  ",
                "finish_reason": "length",
                "prompt_tokens": 5,
                "completion_tokens": 16,
                "error_code": None,
                "error": None,
            },
            {
                "request_key": "c",
                "sample_index": 0,
                "text": None,
                "finish_reason": None,
                "prompt_tokens": 900,
                "completion_tokens": None,
                "error_code": "context_length_exceeded",
                "error": "x",
            },
        ],
        schema=OUTPUT_SCHEMA,
    )
    scorers = resolve_scorers(["completion_tokens", "finish_reason", "empty_output"])
    scores = {(r["request_key"], r["scorer"]): (r["value"], r["label"]) for r in score_outputs(outputs, scorers).to_pylist()}
    assert scores == {
        ("a", "completion_tokens"): (2.0, None),
        ("a", "finish_reason"): (0.0, "stop"),
        ("a", "empty_output"): (0.0, None),
        ("b", "completion_tokens"): (16.0, None),
        ("b", "finish_reason"): (1.0, "length"),
        ("b", "empty_output"): (1.0, None),
    }


def test_default_scorers_without_reference_or_logprobs_write_no_rows_for_them():
    table = score_rows([row("a b a b")], resolve_scorers(DEFAULT_SCORERS))
    assert set(table["scorer"].to_pylist()) == {
        "completion_tokens",
        "completion_chars",
        "finish_reason",
        "empty_output",
        "refusal",
        "valid_json",
        "distinct_2",
    }
    assert all(version for version in table["scorer_version"].to_pylist())


def test_text_scorers():
    assert score("completion_chars", row("hello")) == (5.0, None)
    assert score("refusal", row("I'm sorry, I can't help with that.")) == (1.0, "I'm sorry")
    assert score("refusal", row("Sure, here it is.")) == (0.0, None)
    assert score("valid_json", row('```json\n{"a": 1}\n```')) == (1.0, None)
    value, label = score("valid_json", row("{a: 1}"))
    assert value == 0.0 and label.startswith("invalid JSON")
    assert score({"name": "regex", "options": {"pattern": r"\d{3}"}}, row("call 555 now")) == (1.0, None)
    assert score({"name": "regex", "options": {"pattern": "^yes$", "ignore_case": True}}, row("no")) == (0.0, None)
    assert score("distinct_n", row("the cat the cat")) == (2 / 3, None)  # (the cat), (cat the), (the cat)
    assert score({"name": "distinct_n", "options": {"n": 1}}, row("a a a a")) == (0.25, None)
    assert score("distinct_n", row("one")) is None  # no bigram: nothing to score


def test_json_schema_conformance_names_the_failing_field():
    spec = {
        "name": "json_schema",
        "options": {
            "schema": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            }
        },
    }
    assert score(spec, row('{"name": "x", "age": 3}')) == (1.0, None)
    value, label = score(spec, row('{"name": "x", "age": "three"}'))
    assert value == 0.0 and label.startswith("$.age:")
    value, label = score(spec, row("not json"))
    assert value == 0.0 and label.startswith("invalid JSON")
    with pytest.raises(SpecError, match="scorer json_schema: SchemaError"):
        resolve_scorer({"name": "json_schema", "options": {"schema": {"type": "nonsense"}}})


def test_reference_scorers_score_only_rows_with_a_reference():
    assert score("exact_match", row(" Paris ", reference="paris")) == (1.0, None)
    assert score("exact_match", row("Paris, France", reference="Paris")) == (0.0, None)
    assert score("contains", row("It is Paris, France.", reference="paris")) == (1.0, None)
    assert score("exact_match", row("Paris")) is None
    same, _ = score("chrf", row("the quick brown fox", reference="the quick brown fox"))
    close, _ = score("chrf", row("the quick brown dog", reference="the quick brown fox"))
    far, _ = score("chrf", row("zzz", reference="the quick brown fox"))
    assert same == pytest.approx(1.0) and 0 <= far < close < same


def test_logprob_scorers_read_mean_logprob_and_skip_rows_without_it():
    assert score("mean_logprob", row("x", mean_logprob=-0.5)) == (-0.5, None)
    assert score("perplexity", row("x", mean_logprob=-0.5)) == (pytest.approx(math.exp(0.5)), None)
    assert score("perplexity", row("x", mean_logprob=None)) is None
    assert score("mean_logprob", row("x")) is None  # outputs written before logprobs existed


def test_options_are_part_of_the_version_and_unknown_scorers_are_named():
    first = resolve_scorer({"name": "regex", "options": {"pattern": "a"}})
    second = resolve_scorer({"name": "regex", "options": {"pattern": "b"}})
    assert first.version != second.version
    with pytest.raises(SpecError, match="scorer nope: not a built-in"):
        resolve_scorer("nope")
    with pytest.raises(SpecError, match="scorer no_such_module:x: not a built-in .* nor a registered user scorer"):
        resolve_scorer("no_such_module:x")
    with pytest.raises(SpecError, match="a name appears twice"):
        resolve_scorers(["refusal", ScorerSpec(name="refusal")])


def test_user_scorer_registered_by_entry_point(install_scorers):
    install_scorers(
        "my_scorers",
        """
        from tasks.scoring.scorers import Scorer, per_row, scorer_factory

        shouting = Scorer("shouting", "2", per_row(lambda row: (float(row["text"].isupper()), None)))

        @scorer_factory
        def starts_with(prefix):
            return Scorer(
                "starts_with", "1+" + prefix, per_row(lambda row: (float(row["text"].startswith(prefix)), None)), "higher"
            )
        """,
        {"shouting": "my_scorers:shouting", "starts_with": "my_scorers:starts_with"},
    )
    # a user scorer declares its direction, or has none (no winner in a comparison)
    assert resolve_scorer("shouting").direction == "none"
    assert resolve_scorer({"name": "starts_with", "options": {"prefix": "He"}}).direction == "higher"
    assert score("shouting", row("HEY")) == (1.0, None)
    assert score("my_scorers:shouting", row("HEY")) == (1.0, None)  # its import path names it too
    assert score({"name": "starts_with", "options": {"prefix": "He"}}, row("Hello")) == (1.0, None)
    table = score_rows([row("HEY")], resolve_scorers(["shouting"]))
    assert (table.to_pylist()[0]["scorer_version"], table.to_pylist()[0]["direction"]) == ("2", "none")
    with pytest.raises(SpecError, match="scorer shouting: takes no options"):
        resolve_scorer({"name": "shouting", "options": {"x": 1}})


def test_every_built_in_declares_its_direction_and_score_rows_carry_it():
    directions = {scorer.name: scorer.direction for scorer in resolve_scorers(DEFAULT_SCORERS)}
    assert directions == {
        "completion_tokens": "none",
        "completion_chars": "none",
        "finish_reason": "lower",
        "empty_output": "lower",
        "refusal": "lower",
        "valid_json": "higher",
        "exact_match": "higher",
        "contains": "higher",
        "chrf": "higher",
        "distinct_2": "higher",
        "mean_logprob": "higher",
        "perplexity": "lower",
    }
    assert resolve_scorer({"name": "json_schema", "options": {"schema": {"type": "object"}}}).direction == "higher"
    table = score_rows([row("a b a b")], resolve_scorers(["refusal", "valid_json", "completion_tokens"]))
    assert dict(zip(table["scorer"].to_pylist(), table["direction"].to_pylist())) == {
        "refusal": "lower",
        "valid_json": "higher",
        "completion_tokens": "none",
    }


def test_a_regex_says_which_way_it_counts_and_another_direction_is_another_version():
    wanted = resolve_scorer({"name": "regex", "options": {"pattern": "^\\d+$"}})
    unwanted = resolve_scorer({"name": "regex", "options": {"pattern": "^\\d+$", "direction": "lower"}})
    assert (wanted.direction, unwanted.direction) == ("higher", "lower") and wanted.version != unwanted.version
    with pytest.raises(SpecError, match="direction 'sideways' is not one of higher, lower, none"):
        resolve_scorer({"name": "regex", "options": {"pattern": "x", "direction": "sideways"}})
