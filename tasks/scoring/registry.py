"""The scorer registry: built-ins by name, user scorers registered by the packages that hold them;
and scoring a table of outputs.

A scorer's name comes from whoever starts a flow, so it only ever selects from this registry: a
user scorer is an entry point of an installed package (group `vllm_batch_flows.scorers`), checked
to be a Scorer or a ScorerFactory before anything is called.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

import jsonschema
import pyarrow as pa

from tasks.config import SpecError
from tasks.scoring.judge import judge_scorer
from tasks.scoring.scorers import (
    SCORE_SCHEMA,
    Scorer,
    ScorerFactory,
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

# Each built-in's direction is its third argument to Scorer: which value a comparison counts as a win.
SCORERS: dict[str, Callable[..., Scorer]] = {
    # lengths: longer is not better or worse in itself
    "completion_tokens": lambda: Scorer(
        "completion_tokens", "1", per_row(lambda row: (float(row["completion_tokens"]), None)), "none"
    ),
    "completion_chars": lambda: Scorer("completion_chars", "1", per_row(lambda row: (float(len(row["text"])), None)), "none"),
    # flags of a failure: 1 is worse
    "finish_reason": lambda: Scorer(
        "finish_reason", "1", per_row(lambda row: flag(row["finish_reason"] == "length", row["finish_reason"])), "lower"
    ),
    "empty_output": lambda: Scorer("empty_output", "1", per_row(lambda row: flag(not row["text"].strip())), "lower"),
    "refusal": lambda: Scorer("refusal", "1", per_row(refusal), "lower"),
    # checks passed and likeness to the reference: 1 (or more) is better
    "valid_json": lambda: Scorer("valid_json", "1", per_row(valid_json), "higher"),
    "json_schema": json_schema_scorer,  # higher
    "regex": regex_scorer,  # higher, or its `direction` option
    "exact_match": lambda: Scorer(
        "exact_match", "1", per_row(with_reference(lambda text, ref: flag(normalize(text) == normalize(ref)))), "higher"
    ),
    "contains": lambda: Scorer(
        "contains", "1", per_row(with_reference(lambda text, ref: flag(normalize(ref) in normalize(text)))), "higher"
    ),
    "chrf": lambda: Scorer("chrf", "1+sacrebleu2", per_row(with_reference(chrf)), "higher"),
    "distinct_n": distinct_n_scorer,  # higher: less repetition
    # the model's own likelihood of its answer: a likelier answer is better, a lower perplexity
    "mean_logprob": lambda: Scorer("mean_logprob", "1", per_row(mean_logprob), "higher"),
    "perplexity": lambda: Scorer("perplexity", "1", per_row(perplexity), "lower"),
    "judge": judge_scorer,  # higher
}
# Everything that needs no options; scorers without their input (no reference, no logprobs) write no rows.
DEFAULT_SCORERS = [name for name in SCORERS if name not in ("json_schema", "regex", "judge")]
ENTRY_POINT_GROUP = "vllm_batch_flows.scorers"


Secrets = Callable[[str | None], str | None]


def with_secrets(factory: Callable[..., Scorer], options: dict, secrets: Secrets | None) -> Scorer:
    """Call a scorer factory; one that takes `secrets` (the judge) gets the run-time lookup of Secret blocks."""
    function = factory.make if isinstance(factory, ScorerFactory) else factory
    if secrets is not None and "secrets" in inspect.signature(function).parameters:
        return factory(**options, secrets=secrets)
    return factory(**options)


def registered_scorer(name: str) -> EntryPoint:
    """The installed user scorer of that name (or of that import path, `package.module:attribute`)."""
    registered = entry_points(group=ENTRY_POINT_GROUP)
    for entry in registered:
        if name in (entry.name, entry.value):
            return entry
    raise SpecError(
        f"scorer {name}: not a built-in ({', '.join(SCORERS)}) nor a registered user scorer "
        f"(entry points of group {ENTRY_POINT_GROUP}: {', '.join(sorted(registered.names)) or 'none installed'})"
    )


def load_user_scorer(entry: EntryPoint) -> Scorer | ScorerFactory:
    found = entry.load()
    if not isinstance(found, Scorer | ScorerFactory):
        raise SpecError(
            f"scorer {entry.name}: {entry.value} is {type(found).__name__}, not a Scorer or a function marked @scorer_factory"
        )
    return found


def resolve_scorer(spec: str | ScorerSpec | dict, secrets: Secrets | None = None) -> Scorer:
    """A built-in by name, or a registered user scorer (a `Scorer`, or a `ScorerFactory` taking the options)."""
    spec = ScorerSpec(name=spec) if isinstance(spec, str) else ScorerSpec.model_validate(spec)
    try:
        if spec.name in SCORERS:
            return with_secrets(SCORERS[spec.name], spec.options, secrets)
        found = load_user_scorer(registered_scorer(spec.name))
        if isinstance(found, Scorer):
            if spec.options:
                raise SpecError(f"scorer {spec.name}: takes no options (it is a Scorer, not a factory)")
            return found
        scorer = with_secrets(found, spec.options, secrets)
    except (ImportError, AttributeError, TypeError, ValueError, re.error, jsonschema.SchemaError) as error:
        if isinstance(error, SpecError):
            raise
        raise SpecError(f"scorer {spec.name}: {type(error).__name__}: {error}") from error
    if not isinstance(scorer, Scorer):
        raise SpecError(f"scorer {spec.name}: its factory returned {type(scorer).__name__}, not a Scorer")
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
            "direction": scorer.direction,
        }
        for scorer in scorers
        for row, result in zip(ok, scorer.score(ok))
        if result is not None
    ]
    return pa.Table.from_pylist(records, schema=SCORE_SCHEMA)


def score_outputs(outputs: pa.Table, scorers: list[Scorer]) -> pa.Table:
    return score_rows(outputs.to_pylist(), scorers)


def with_directions(scores: pa.Table, scorers: list[Scorer]) -> pa.Table:
    """A score table from before directions were recorded, with each scorer's direction (its values unchanged)."""
    directions = {scorer.name: scorer.direction for scorer in scorers}
    column = pa.array([directions.get(name, "none") for name in scores["scorer"].to_pylist()], pa.string())
    return scores.append_column("direction", column).select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
