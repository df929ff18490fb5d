"""Score: small versioned functions over (request, output), registered by name.

A scorer maps a list of rows (the output's columns plus the request's `prompt`, `messages` and
`reference`) to one `(value, label)` per row, or None where there is nothing to score (no
reference, no logprobs). Its version goes into every score row: a changed scorer writes new rows
beside the old ones.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import jinja2.sandbox
import jsonschema
import pyarrow as pa
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks import files
from tasks.config import ModelConfig, SamplingConfig, SpecError
from tasks.infer import ShardOutput
from tasks.prepare import RequestSet
from tasks.render import content_hash

SCORE_SCHEMA = pa.schema(
    [
        ("request_key", pa.string()),
        ("sample_index", pa.int32()),
        ("scorer", pa.string()),
        ("scorer_version", pa.string()),
        ("value", pa.float64()),
        ("label", pa.string()),
    ]
)

Score = tuple[float | None, str | None] | None  # None: no score row for this output


@dataclass(frozen=True)
class Scorer:
    name: str
    version: str  # bump when the function changes: old scores stay, new ones sit beside them
    score: Callable[[list[dict]], list[Score]]


class ScorerSpec(BaseModel):
    """A scorer with options: a built-in name or a user scorer's import path `package.module:attribute`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the scorer's factory.")


def per_row(function: Callable[[dict], Score]) -> Callable[[list[dict]], list[Score]]:
    return lambda rows: [function(row) for row in rows]


def versioned(version: str, options: dict) -> str:
    """Options change what a scorer measures, so they are part of its version."""
    return f"{version}+{content_hash(options)[:8]}" if options else version


def flag(condition: bool, label: str | None = None) -> Score:
    return (1.0 if condition else 0.0, label)


# --- plain scorers -------------------------------------------------------------------------------

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
    return Scorer("json_schema", versioned("1", {"schema": schema}), per_row(score))


def regex_scorer(pattern: str, ignore_case: bool = False) -> Scorer:
    compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    return Scorer(
        "regex",
        versioned("1", {"pattern": pattern, "ignore_case": ignore_case}),
        per_row(lambda row: flag(compiled.search(row["text"]) is not None)),
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

    return Scorer(f"distinct_{n}", "1", per_row(score))


def mean_logprob(row: dict) -> Score:
    value = row.get("mean_logprob")
    return None if value is None else (value, None)


def perplexity(row: dict) -> Score:
    value = row.get("mean_logprob")
    return None if value is None else (math.exp(-value), None)


# --- LLM as judge --------------------------------------------------------------------------------

DEFAULT_RUBRIC = (
    "Rate the answer to the question on a scale from 1 (useless) to 10 (excellent) for correctness, "
    "helpfulness and clarity.\n\nQuestion:\n{{ prompt }}\n\nAnswer:\n{{ response }}\n\n"
    "Reply with one line: Score: <1-10>"
)
JUDGE_SCORE = [
    re.compile(r"(?i)\b(?:score|rating)\s*(?:is|of)?\s*[:=]?\s*\**\s*(10|[1-9])(?:\s*/\s*10)?(?!\.?\d)"),
    re.compile(r"(?<![\d.])(10|[1-9])\s*/\s*10(?!\.?\d)"),
    re.compile(r"^\s*\**(10|[1-9])\**\s*\.?\s*$"),
]
UNPARSEABLE = "unparseable"


def parse_judge_score(answer: str | None) -> float | None:
    """The 1–10 score in a judge's answer, or None when the answer holds no clear score."""
    for pattern in JUDGE_SCORE:
        match = pattern.search(answer or "")
        if match:
            return float(match.group(1))
    return None


def user_prompt(row: dict) -> str:
    if row.get("messages"):
        users = [m["content"] for m in json.loads(row["messages"]) if m.get("role") == "user"]
        if users:
            return users[-1]
    return row.get("prompt") or ""


def judge_scorer(
    model: ModelConfig | dict,
    rubric: str = DEFAULT_RUBRIC,
    sampling: SamplingConfig | dict | None = None,
    name: str = "judge",
) -> Scorer:
    """Ask a second model (either engine) to grade each answer; its rubric, model and sampling make up its version."""
    from tasks.engine import generate_with_engine, model_fingerprint, sampling_hash
    from tasks.openai_engine import generate_over_http

    model = ModelConfig.model_validate(model)
    sampling = SamplingConfig.model_validate(sampling or {"max_tokens": 16})
    template = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined).from_string(rubric)
    version = "1+" + content_hash(
        {"rubric": rubric, "model": model_fingerprint(model), "sampling": sampling_hash(sampling)}
    )[:8]

    def score(rows: list[dict]) -> list[Score]:
        if not rows:
            return []
        prompts = [
            template.render(prompt=user_prompt(row), response=row["text"], reference=row.get("reference"))
            for row in rows
        ]
        judge_requests = pa.table(
            {
                "request_key": [str(i) for i in range(len(rows))],
                "prompt": prompts,
                "messages": [json.dumps([{"role": "user", "content": p}]) if model.mode == "chat" else None for p in prompts],
            }
        )
        if model.engine == "openai":
            answers = generate_over_http(model, judge_requests, sampling).outputs
        else:
            answers = generate_with_engine(model, judge_requests, sampling, key=f"judge-{version}").outputs
        by_index = {int(a["request_key"]): a for a in answers.to_pylist() if a["sample_index"] == 0}
        results: list[Score] = []
        for i in range(len(rows)):
            answer = by_index[i]
            if answer["error_code"] is not None:
                results.append((None, f"judge_error: {answer['error_code']}"))
                continue
            value = parse_judge_score(answer["text"])
            results.append((value, None) if value is not None else (None, UNPARSEABLE))
        return results

    return Scorer(name, version, score)


# --- registry ------------------------------------------------------------------------------------

SCORERS: dict[str, Callable[..., Scorer]] = {
    "completion_tokens": lambda: Scorer(
        "completion_tokens", "1", per_row(lambda row: (float(row["completion_tokens"]), None))
    ),
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


def resolve_scorer(spec: str | ScorerSpec | dict) -> Scorer:
    """A built-in by name, or a user scorer by import path (a `Scorer`, or a factory returning one)."""
    spec = ScorerSpec(name=spec) if isinstance(spec, str) else ScorerSpec.model_validate(spec)
    try:
        if spec.name in SCORERS:
            return SCORERS[spec.name](**spec.options)
        if ":" not in spec.name:
            raise SpecError(
                f"scorer {spec.name}: not a built-in ({', '.join(SCORERS)}) nor an import path 'package.module:attribute'"
            )
        module, attribute = spec.name.split(":", 1)
        found = getattr(importlib.import_module(module), attribute)
        scorer = found if isinstance(found, Scorer) and not spec.options else found(**spec.options)
    except (ImportError, AttributeError, TypeError, ValueError, re.error, jsonschema.SchemaError) as error:
        raise SpecError(f"scorer {spec.name}: {type(error).__name__}: {error}") from error
    if not isinstance(scorer, Scorer):
        raise SpecError(f"scorer {spec.name}: import path gives {type(scorer).__name__}, not a tasks.score.Scorer")
    return scorer


def resolve_scorers(specs: list[str | ScorerSpec]) -> list[Scorer]:
    scorers = [resolve_scorer(spec) for spec in specs]
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


def outputs_with_requests(output_path: str, request_files: list[str]) -> pa.Table:
    """An output shard joined with what its requests asked (prompt, messages, reference)."""
    with duckdb.connect() as con:
        return con.sql(
            """
            SELECT o.*, q.prompt, q.messages, q.reference
            FROM read_parquet(?) o
            LEFT JOIN (SELECT request_key, prompt, messages, reference FROM read_parquet(?)
                       WHERE duplicate_of IS NULL) q USING (request_key)
            """,
            params=[output_path, request_files],
        ).to_arrow_table()


@task(name="write-scores")
def write_scores(
    outputs: list[ShardOutput], request_set: RequestSet, specs: list[str | ScorerSpec], storage: str
) -> list[str]:
    """Score each output shard once per scorer set and dataset version (references belong to the dataset)."""
    scorers = resolve_scorers(specs)
    paths = []
    for output in outputs:
        key = content_hash([output.output_key, request_set.dataset_version, scorers_version(scorers)])
        path = files.join(storage, "scores", f"{key}.parquet")
        if not files.exists(path):
            files.write_parquet(score_outputs(outputs_with_requests(output.path, request_set.request_files), scorers), path)
        paths.append(path)
    return paths
