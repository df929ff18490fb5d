"""Validate: every batch of rendered requests passes a Great Expectations suite.

Built in: id present, prompt present and non-empty, prompt within the context budget (in
approximate tokens, characters / 4), message roles allowed; plus the expectations of the spec,
over the request columns (custom_id, prompt, messages, overrides, reference, approx_tokens, roles)
and the dataset's own columns they name (read for validation only, in their own types).
Rows an expectation flags become rejected rows with the expectation as the reason; the run goes
on. An expectation that raises (a bad regex, a comparison across types) rejects every row of the
batch with the error as the reason: rows it could not check are not let through. Id uniqueness is reported here, and enforced across batches by the deduper (the first row
with an id is kept, later ones are rejected).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

import pyarrow as pa

from tasks.config import SpecError, ValidationConfig
from tasks.prepare.sources import REJECTED_SCHEMA


def builtin_expectations(config: ValidationConfig, context_tokens: int | None) -> list[dict]:
    # The roles column is a JSON list: each allowed role is matched as a whole JSON string, quotes included.
    roles = "|".join(re.escape(json.dumps(role, ensure_ascii=False)) for role in config.allowed_roles)
    expectations = [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "custom_id"}},
        {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "custom_id"}},
        {"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "dedupe_text", "min_value": 1}},
        {
            "type": "expect_column_values_to_match_regex",
            "kwargs": {"column": "roles", "regex": f"^\\[(?:{roles})(?:,(?:{roles}))*\\]$"},
        },
    ]
    budget = config.max_prompt_tokens or context_tokens
    if budget:
        expectations.append(
            {"type": "expect_column_values_to_be_between", "kwargs": {"column": "approx_tokens", "max_value": budget}}
        )
    return expectations


def reason_for(expectation: dict) -> tuple[str, str]:
    """(field, reason) of a failed expectation, in words for the built-in ones."""
    kind, kwargs = expectation["type"], expectation["kwargs"]
    column = kwargs.get("column", "row")
    if column == "approx_tokens":
        return "prompt", f"prompt too long: over the context budget of {kwargs['max_value']} tokens (characters / 4)"
    if column == "roles":
        return "messages", "message role not allowed (see validation.allowed_roles)"
    if column == "dedupe_text":
        return "prompt", "prompt is empty"
    details = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "column")
    return column, f"failed {kind}" + (f" ({details})" if details else "")


def raised_error(outcome) -> str | None:
    """The message of an exception the expectation raised; GX reports it at the top or per metric."""
    info = outcome.exception_info or {}
    for report in [info, *(value for value in info.values() if isinstance(value, dict))]:
        if report.get("raised_exception"):
            return str(report.get("exception_message"))
    return None


@dataclass
class ExpectationTally:
    expectation: str
    column: str
    rows: int = 0
    unexpected: int = 0
    errors: list[str] = field(default_factory=list)


class Validator:
    """One ephemeral GX context and suite; `validate` runs it on one batch (memory stays per batch)."""

    def __init__(self, config: ValidationConfig, context_tokens: int | None = None):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.exceptions import ExpectationNotFoundError
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        asset = self.context.data_sources.add_pandas("requests").add_dataframe_asset("batch")
        self.batches = asset.add_batch_definition_whole_dataframe("batch")
        self.expectations = builtin_expectations(config, context_tokens) + list(config.expectations)
        suite = gx.ExpectationSuite(name="requests")
        for position, item in enumerate(self.expectations):
            if not isinstance(item, dict) or "type" not in item:
                raise SpecError(
                    f"validation.expectations[{position - len(self.expectations) + len(config.expectations)}]: "
                    "write each as {type: expect_..., kwargs: {...}}"
                )
            try:
                suite.add_expectation(ExpectationConfiguration(type=item["type"], kwargs=item.get("kwargs", {})).to_domain_obj())
            except ExpectationNotFoundError as error:
                raise SpecError(f"validation.expectations: unknown expectation {item['type']}") from error
            except Exception as error:  # GX raises pydantic errors for bad kwargs
                raise SpecError(f"validation.expectations: {item['type']}: {error}") from error
        self.suite = self.context.suites.add(suite)
        self.tallies = [ExpectationTally(e["type"], e.get("kwargs", {}).get("column", "")) for e in self.expectations]

    def validate(self, requests: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(requests that pass, rejected rows)."""
        if requests.num_rows == 0:
            return requests, pa.Table.from_pylist([], schema=REJECTED_SCHEMA)
        frame = requests.to_pandas()
        result = self.batches.get_batch(batch_parameters={"dataframe": frame}).validate(
            self.suite, result_format={"result_format": "COMPLETE", "include_unexpected_rows": False}
        )
        failed: dict[int, tuple[str, str]] = {}
        for outcome in result.results:
            config = outcome.expectation_config
            position = next(i for i, e in enumerate(self.expectations) if self.matches(e, config))
            tally = self.tallies[position]
            tally.rows += requests.num_rows
            if (error := raised_error(outcome)) is not None:
                # Rows an expectation could not check are not known to pass it: each is rejected, saying why.
                tally.errors.append(error)
                tally.unexpected += requests.num_rows
                reason = f"{config.type} could not be checked: {error}"
                for index in range(requests.num_rows):
                    failed.setdefault(index, (self.expectations[position].get("kwargs", {}).get("column", "row"), reason))
                continue
            unexpected = outcome.result.get("unexpected_index_list") or []
            tally.unexpected += len(unexpected)
            if config.type == "expect_column_values_to_be_unique":
                continue  # the deduper keeps the first row with an id and rejects the others
            for index in unexpected:
                failed.setdefault(int(index), reason_for(self.expectations[position]))
        if not failed:
            return requests, pa.Table.from_pylist([], schema=REJECTED_SCHEMA)
        rows = sorted(failed)
        bad = requests.take(rows)
        rejected = pa.table(
            {
                "source_file": bad["source_file"],
                "source_row": bad["source_row"],
                "custom_id": bad["custom_id"],
                "field": pa.array([failed[r][0] for r in rows], pa.string()),
                "reason": pa.array([failed[r][1] for r in rows], pa.string()),
            },
            schema=REJECTED_SCHEMA,
        )
        keep = pa.array([i not in failed for i in range(requests.num_rows)])
        return requests.filter(keep), rejected

    @staticmethod
    def matches(expectation: dict, config) -> bool:
        kwargs = expectation.get("kwargs", {})
        return expectation["type"] == config.type and all(config.kwargs.get(k) == v for k, v in kwargs.items())

    def report(self) -> list[dict]:
        """One row per expectation over every batch: the validation result, as the artifact shows it."""
        return [
            {
                "expectation": t.expectation,
                "column": t.column,
                "rows": t.rows,
                "unexpected": t.unexpected,
                "success": t.unexpected == 0 and not t.errors,
                "errors": "; ".join(sorted(set(t.errors)))[:300],
            }
            for t in self.tallies
        ]
