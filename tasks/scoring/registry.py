"""The scorer registry: built-ins by name, user scorers by import path; and scoring a table of outputs."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable

import jsonschema
import pyarrow as pa

from tasks.config import SpecError
from tasks.scoring.judge import judge_scorer
from tasks.scoring.scorers import (
    SCORE_SCHEMA,
    Scorer,
    ScorerSpec,
    chrf,
    distinct_n_scorer,
    flag,
    json_schema_scorer,
    mean_logprob,
    normalize,
    per_row,
    perplexity,
    refusal,
    regex_scorer,
    valid_json,
    with_reference,
)

SCORERS: dict[str, Callable[..., Scorer]] = {
    "completion_tokens": lambda: Scorer("completion_tokens", "1", per_row(lambda row: (float(row["completion_tokens"]), None))),
    "completion_chars": lambda: Scorer("completion_chars", "1", per_row(lambda row: (float(len(row["text"])), None))),
    "finish_reason": lambda: Scorer(
        "finish_reason", "1", per_row(lambda row: flag(row["finish_reason"] == "length", row["finish_reason"]))
    ),
    "empty_output": lambda: Scorer("empty_output", "1", per_row(lambda row: flag(not row["text"].strip()))),
    "refusal": lambda: Scorer("refusal", "1", per_row(refusal)),
    "valid_json": lambda: Scorer("valid_json", "1", per_row(valid_json)),
    "json_schema": json_schema_scorer,
    "regex": regex_scorer,
    "exact_match": lambda: Scorer(
        "exact_match", "1", per_row(with_reference(lambda text, ref: flag(normalize(text) == normalize(ref))))
    ),
    "contains": lambda: Scorer(
        "contains", "1", per_row(with_reference(lambda text, ref: flag(normalize(ref) in normalize(text))))
    ),
    "chrf": lambda: Scorer("chrf", "1+sacrebleu2", per_row(with_reference(chrf))),
    "distinct_n": distinct_n_scorer,
    "mean_logprob": lambda: Scorer("mean_logprob", "1", per_row(mean_logprob)),
    "perplexity": lambda: Scorer("perplexity", "1", per_row(perplexity)),
    "judge": judge_scorer,
}
# Everything that needs no options; scorers without their input (no reference, no logprobs) write no rows.
DEFAULT_SCORERS = [name for name in SCORERS if name not in ("json_schema", "regex", "judge")]


Secrets = Callable[[str | None], str | None]


def with_secrets(factory: Callable[..., Scorer], options: dict, secrets: Secrets | None) -> Scorer:
    """Call a scorer factory; one that takes `secrets` (the judge) gets the run-time lookup of Secret blocks."""
    if secrets is not None and "secrets" in inspect.signature(factory).parameters:
        return factory(**options, secrets=secrets)
    return factory(**options)


def resolve_scorer(spec: str | ScorerSpec | dict, secrets: Secrets | None = None) -> Scorer:
    """A built-in by name, or a user scorer by import path (a `Scorer`, or a factory returning one)."""
    spec = ScorerSpec(name=spec) if isinstance(spec, str) else ScorerSpec.model_validate(spec)
    try:
        if spec.name in SCORERS:
            return with_secrets(SCORERS[spec.name], spec.options, secrets)
        if ":" not in spec.name:
            raise SpecError(
                f"scorer {spec.name}: not a built-in ({', '.join(SCORERS)}) nor an import path 'package.module:attribute'"
            )
        module, attribute = spec.name.split(":", 1)
        found = getattr(importlib.import_module(module), attribute)
        scorer = found if isinstance(found, Scorer) and not spec.options else with_secrets(found, spec.options, secrets)
    except (ImportError, AttributeError, TypeError, ValueError, re.error, jsonschema.SchemaError) as error:
        raise SpecError(f"scorer {spec.name}: {type(error).__name__}: {error}") from error
    if not isinstance(scorer, Scorer):
        raise SpecError(f"scorer {spec.name}: import path gives {type(scorer).__name__}, not a tasks.scoring.scorers.Scorer")
    return scorer


def resolve_scorers(specs: list[str | ScorerSpec], secrets: Secrets | None = None) -> list[Scorer]:
    scorers = [resolve_scorer(spec, secrets) for spec in specs]
    names = [scorer.name for scorer in scorers]
    if len(set(names)) != len(names):
        raise SpecError(f"scorers: a name appears twice in {names}; give a second judge its own `name` option")
    return scorers


def scorers_version(scorers: list[Scorer]) -> str:
    return ",".join(f"{scorer.name}@{scorer.version}" for scorer in sorted(scorers, key=lambda s: s.name))


def score_rows(rows: list[dict], scorers: list[Scorer]) -> pa.Table:
    """Score rows for every successful output; error rows have nothing to score."""
    ok = [row for row in rows if row["error_code"] is None]
    records = [
        {
            "request_key": row["request_key"],
            "sample_index": row["sample_index"],
            "scorer": scorer.name,
            "scorer_version": scorer.version,
            "value": result[0],
            "label": result[1],
        }
        for scorer in scorers
        for row, result in zip(ok, scorer.score(ok))
        if result is not None
    ]
    return pa.Table.from_pylist(records, schema=SCORE_SCHEMA)


def score_outputs(outputs: pa.Table, scorers: list[Scorer]) -> pa.Table:
    return score_rows(outputs.to_pylist(), scorers)
