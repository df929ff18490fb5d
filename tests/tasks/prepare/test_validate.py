import pyarrow as pa
import pytest

from tasks.config import SpecError, ValidationConfig
from tasks.prepare.validate import Validator


def requests(rows: list[dict]) -> pa.Table:
    base = {
        "custom_id": None,
        "prompt": "p",
        "messages": None,
        "overrides": None,
        "reference": None,
        "approx_tokens": 1,
        "roles": '["user"]',
        "dedupe_text": "p",
        "source_file": "f.parquet",
        "source_row": 0,
    }
    return pa.Table.from_pylist([{**base, "source_row": i, **row} for i, row in enumerate(rows)])


def test_rows_failing_the_builtin_suite_are_rejected_with_reason_and_location():
    validator = Validator(ValidationConfig(allowed_roles=["system", "user"]), context_tokens=100)
    valid, rejected = validator.validate(
        requests(
            [
                {"custom_id": "ok"},
                {"custom_id": "long", "approx_tokens": 101},
                {"custom_id": "role", "roles": '["system","tool"]'},
                {"custom_id": "ok"},  # a repeated id is the deduper's to reject (it keeps the first)
            ]
        )
    )
    assert valid["custom_id"].to_pylist() == ["ok", "ok"]
    assert [(r["source_row"], r["custom_id"], r["field"]) for r in rejected.to_pylist()] == [
        (1, "long", "prompt"),
        (2, "role", "messages"),
    ]
    assert rejected["reason"][0].as_py() == "prompt too long: over the context budget of 100 tokens (characters / 4)"
    report = {row["expectation"] + ":" + row["column"]: row for row in validator.report()}
    assert report["expect_column_values_to_be_unique:custom_id"]["unexpected"] == 2
    assert report["expect_column_values_to_be_between:approx_tokens"]["success"] is False


def test_user_expectations_from_the_spec_reject_rows_too():
    config = ValidationConfig(
        expectations=[{"type": "expect_column_values_to_match_regex", "kwargs": {"column": "prompt", "regex": r"\?$"}}]
    )
    valid, rejected = Validator(config).validate(
        requests([{"custom_id": "q", "prompt": "Why?"}, {"custom_id": "s", "prompt": "No."}])
    )
    assert valid["custom_id"].to_pylist() == ["q"]
    assert rejected.to_pylist()[0]["reason"] == "failed expect_column_values_to_match_regex (regex='\\\\?$')"


def test_an_unknown_user_expectation_is_a_spec_error():
    with pytest.raises(SpecError, match="unknown expectation expect_the_moon"):
        Validator(ValidationConfig(expectations=[{"type": "expect_the_moon", "kwargs": {}}]))
