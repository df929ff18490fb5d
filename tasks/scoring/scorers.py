"""Scorers: small versioned functions over (request, output).

A scorer maps a list of rows (the output's columns plus the request's `prompt`, `messages` and
`reference`) to one `(value, label)` per row, or None where there is nothing to score (no
reference, no logprobs). Its version goes into every score row: a changed scorer writes new rows
beside the old ones. Its direction goes there too: whether a higher value is better (`higher`),
a lower one (`lower`), or neither (`none`, e.g. a length): comparisons count wins by it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import jsonschema
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_serializer

from tasks.keys import content_hash
from tasks.redact import redact_options

SCORE_SCHEMA = pa.schema(
    [
        ("request_key", pa.string()),
        ("sample_index", pa.int32()),
        ("scorer", pa.string()),
        ("scorer_version", pa.string()),
        ("value", pa.float64()),
        ("label", pa.string()),
        ("direction", pa.string()),
    ]
)

Score = tuple[float | None, str | None] | None  # None: no score row for this output
# Which value is better: a win in a comparison is a better value by it; `none` has no winner (a length).
Direction = Literal["higher", "lower", "none"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)


@dataclass(frozen=True)
class Scorer:
    name: str
    version: str  # bump when the function changes: old scores stay, new ones sit beside them
    score: Callable[[list[dict]], list[Score]]
    direction: Direction = "none"  # a user scorer that says nothing has no winner in a comparison

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"scorer {self.name}: direction {self.direction!r} is not one of {', '.join(DIRECTIONS)}")


@dataclass(frozen=True)
class ScorerFactory:
    """A function from options to a Scorer, marked as one (`@scorer_factory`): the registry calls
    nothing it has not checked to be a Scorer or a ScorerFactory."""

    make: Callable[..., Scorer]

    def __call__(self, **options: Any) -> Scorer:
        return self.make(**options)


def scorer_factory(make: Callable[..., Scorer]) -> ScorerFactory:
    """Mark a user scorer's factory: `@scorer_factory def starts_with(prefix): return Scorer(...)`."""
    return ScorerFactory(make)


class ScorerSpec(BaseModel):
    """A scorer with options: a built-in name or the name of a registered user scorer (see registry)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the scorer's factory.")

    @field_serializer("options", when_used="json")
    def _options_without_secrets(self, options: dict[str, Any]) -> dict[str, Any]:
        """A judge's model options may hold a URL with credentials: recorded (as parameters, in logs) without them."""
        return redact_options(options)


def per_row(function: Callable[[dict], Score]) -> Callable[[list[dict]], list[Score]]:
    return lambda rows: [function(row) for row in rows]


def versioned(version: str, options: dict) -> str:
    """Options change what a scorer measures, so they are part of its version."""
    return f"{version}+{content_hash(options)[:8]}" if options else version


def flag(condition: bool, label: str | None = None) -> Score:
    return (1.0 if condition else 0.0, label)


REFUSAL = re.compile(
    r"\b(I can(?:no|')t (?:help|assist|do|comply|provide)|I(?: am|'m) (?:sorry|unable|not able)|"
    r"I won't|as an AI(?: language model)?)\b",
    re.IGNORECASE,
)


def refusal(row: dict) -> Score:
    match = REFUSAL.search(row["text"])
    return flag(match is not None, match.group(0) if match else None)


def strip_code_fence(text: str) -> str:
    """Models often wrap JSON in ```json fences; the JSON inside is what a user would parse."""
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.DOTALL)
    return match.group(1) if match else text


def parse_json(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(strip_code_fence(text)), None
    except json.JSONDecodeError as error:
        return None, f"invalid JSON: {error.msg} at {error.pos}"


def valid_json(row: dict) -> Score:
    _, error = parse_json(row["text"])
    return flag(error is None, error)


def json_schema_scorer(schema: dict) -> Scorer:
    validator = jsonschema.Draft202012Validator(schema)

    def score(row: dict) -> Score:
        value, error = parse_json(row["text"])
        if error is not None:
            return 0.0, error
        problem = jsonschema.exceptions.best_match(validator.iter_errors(value))
        return flag(problem is None, None if problem is None else f"{problem.json_path}: {problem.message}"[:300])

    jsonschema.Draft202012Validator.check_schema(schema)
    return Scorer("json_schema", versioned("1", {"schema": schema}), per_row(score), "higher")


def regex_scorer(pattern: str, ignore_case: bool = False, direction: Direction = "higher") -> Scorer:
    """1 when the pattern matches: by default the shape an answer should have (`direction: lower`
    for a pattern it should not have). Another direction is another version: stored rows keep theirs."""
    compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    options = {"pattern": pattern, "ignore_case": ignore_case} | ({} if direction == "higher" else {"direction": direction})
    return Scorer(
        "regex",
        versioned("1", options),
        per_row(lambda row: flag(compiled.search(row["text"]) is not None)),
        direction,
    )


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def with_reference(function: Callable[[str, str], Score]) -> Callable[[dict], Score]:
    return lambda row: None if row.get("reference") is None else function(row["text"], row["reference"])


def chrf(text: str, reference: str) -> Score:
    import sacrebleu

    return sacrebleu.sentence_chrf(text, [reference]).score / 100, None


def distinct_n_scorer(n: int = 2) -> Scorer:
    """Share of distinct word n-grams: low values mean the answer repeats itself."""

    def score(row: dict) -> Score:
        words = row["text"].split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        return (len(set(grams)) / len(grams), None) if grams else None

    return Scorer(f"distinct_{n}", "1", per_row(score), "higher")


def mean_logprob(row: dict) -> Score:
    value = row.get("mean_logprob")
    return None if value is None else (value, None)


def perplexity(row: dict) -> Score:
    value = row.get("mean_logprob")
    return None if value is None else (math.exp(-value), None)
