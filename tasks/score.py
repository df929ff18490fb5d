"""Score: small versioned functions over one output row, registered by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from prefect import task

from tasks import files
from tasks.infer import ShardOutput
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


@dataclass(frozen=True)
class Scorer:
    name: str
    version: str  # bump when the function changes: old scores stay, new ones sit beside them
    score: Callable[[dict], tuple[float | None, str | None]]


SCORERS = {
    scorer.name: scorer
    for scorer in [
        Scorer("completion_tokens", "1", lambda output: (float(output["completion_tokens"]), None)),
        Scorer(
            "finish_reason",
            "1",
            lambda output: (1.0 if output["finish_reason"] == "length" else 0.0, output["finish_reason"]),
        ),
        Scorer("empty_output", "1", lambda output: (0.0 if output["text"].strip() else 1.0, None)),
    ]
}
DEFAULT_SCORERS = list(SCORERS)


def score_outputs(outputs: pa.Table, scorer_names: list[str]) -> pa.Table:
    """Score rows for every successful output; error rows have nothing to score."""
    scorers = [SCORERS[name] for name in scorer_names]
    rows = [
        {
            "request_key": output["request_key"],
            "sample_index": output["sample_index"],
            "scorer": scorer.name,
            "scorer_version": scorer.version,
            "value": value,
            "label": label,
        }
        for output in outputs.to_pylist()
        if output["error_code"] is None
        for scorer in scorers
        for value, label in [scorer.score(output)]
    ]
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


def scorers_version(scorer_names: list[str]) -> str:
    return ",".join(f"{name}@{SCORERS[name].version}" for name in sorted(scorer_names))


@task(name="write-scores")
def write_scores(outputs: list[ShardOutput], scorer_names: list[str], storage: str) -> list[str]:
    """Score each output shard once per scorer set; the score file is named by what it depends on."""
    paths = []
    for output in outputs:
        key = content_hash([output.output_key, scorers_version(scorer_names)])
        path = files.join(storage, "scores", f"{key}.parquet")
        if not files.exists(path):
            files.write_parquet(score_outputs(files.read_parquet(output.path), scorer_names), path)
        paths.append(path)
    return paths
