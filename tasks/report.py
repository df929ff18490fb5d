"""Report: the run summary, as a pydantic record, a Prefect table artifact and a terminal table."""

from __future__ import annotations

import base64
import io
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from tasks import files
from tasks.config import ModelConfig
from tasks.infer import ShardOutput
from tasks.prepare import RequestSet


class StageClock:
    """Wall seconds per stage of a flow, for the run record and the 'where the time goes' report."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - started, 3)

    def total(self) -> float:
        return time.perf_counter() - self.started


class RunSummary(BaseModel):
    run_id: str
    dataset_name: str
    dataset_version: str
    model: str
    engine: str
    model_fingerprint: str
    rows_read: int
    rejected: int
    requests: int
    unique_requests: int
    duplicates: int
    shards: int
    cached_shards: int
    engine_requests: int
    reused_requests: int = 0  # unique requests answered by outputs already in DuckDB (incremental re-run)
    outputs: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    generated_tokens: int  # completion tokens computed by this run (not from cache)
    tokens_per_second: float  # generated tokens per second of the run's wall time
    wall_seconds: float
    stage_seconds: dict[str, float]  # prepare, shard, infer (of which engine_start, generate), score, commit
    duckdb_path: str


def summarize_run(
    run_id: str,
    dataset_name: str,
    model: ModelConfig,
    model_fingerprint: str,
    request_set: RequestSet,
    outputs: list[ShardOutput],
    cached: list[bool],
    clock: StageClock,
    duckdb_path: str,
    reused_requests: int = 0,
) -> RunSummary:
    computed = [output for output, was_cached in zip(outputs, cached) if not was_cached]
    generated = sum(output.completion_tokens for output in computed)
    wall_seconds = clock.total()
    stage_seconds = {
        **clock.seconds,
        "engine_start": round(sum(output.engine_load_seconds for output in computed), 3),
        "generate": round(sum(output.generate_seconds for output in computed), 3),
    }
    return RunSummary(
        run_id=run_id,
        dataset_name=dataset_name,
        dataset_version=request_set.dataset_version,
        model=model.model,
        engine=model.engine,
        model_fingerprint=model_fingerprint,
        rows_read=request_set.rows_read,
        rejected=request_set.rejected,
        requests=request_set.requests,
        unique_requests=request_set.unique_requests,
        duplicates=request_set.duplicates,
        shards=len(outputs),
        cached_shards=sum(cached),
        engine_requests=sum(output.engine_requests for output in computed),
        reused_requests=reused_requests,
        outputs=sum(output.outputs for output in outputs),
        errors=sum(output.errors for output in outputs),
        prompt_tokens=sum(output.prompt_tokens for output in outputs),
        completion_tokens=sum(output.completion_tokens for output in outputs),
        generated_tokens=generated,
        tokens_per_second=generated / wall_seconds if wall_seconds > 0 else 0.0,
        wall_seconds=wall_seconds,
        stage_seconds=stage_seconds,
        duckdb_path=duckdb_path,
    )


SUMMARY_LABELS = {
    "requests": "requests",
    "unique_requests": "unique requests",
    "duplicates": "duplicates",
    "rejected": "rejected rows",
    "shards": "shards",
    "cached_shards": "cached shards",
    "engine_requests": "requests sent to the engine",
    "reused_requests": "requests answered from earlier runs",
    "outputs": "outputs",
    "errors": "errors",
    "prompt_tokens": "prompt tokens",
    "completion_tokens": "completion tokens",
    "tokens_per_second": "generated tokens/s",
    "wall_seconds": "wall time (s)",
}


def summary_rows(summary: RunSummary) -> list[dict]:
    values = summary.model_dump()
    return [
        {"metric": label, "value": round(values[field], 1) if isinstance(values[field], float) else values[field]}
        for field, label in SUMMARY_LABELS.items()
    ]


def format_summary(summary: RunSummary) -> str:
    width = max(len(label) for label in SUMMARY_LABELS.values())
    lines = [f"run {summary.run_id} — {summary.dataset_name} ({summary.dataset_version[:12]}) on {summary.model}"]
    lines += [f"  {row['metric']:<{width}}  {row['value']}" for row in summary_rows(summary)]
    lines += [f"  {'stage seconds':<{width}}  " + ", ".join(f"{k} {v:.1f}" for k, v in summary.stage_seconds.items())]
    lines += [
        "",
        "Try next:",
        f"  .venv/bin/python scripts/sql.py --db {summary.duckdb_path} \"SELECT custom_id, finish_reason, "
        f"completion_tokens, left(text, 40) AS text FROM run_outputs WHERE run_id = '{summary.run_id}' LIMIT 10\"",
    ]
    return "\n".join(lines)


@task(name="publish-summary")
def publish_summary(summary: RunSummary) -> None:
    create_table_artifact(
        key="batch-inference-summary",
        table=summary_rows(summary),
        description=f"Run {summary.run_id} of {summary.dataset_name} on {summary.model}",
    )


@task(name="publish-validation")
def publish_validation(request_set: RequestSet, dataset_name: str) -> None:
    """The Great Expectations result of the dataset, one row per expectation."""
    create_table_artifact(
        key="dataset-validation",
        table=request_set.validation,
        description=f"Validation of {dataset_name} ({request_set.dataset_version[:12]}): "
        f"{request_set.rejected} of {request_set.rows_read} rows rejected",
    )


def score_values(score_files: list[str]) -> dict[str, list[float]]:
    """Every score value of the run, by scorer."""
    values: dict[str, list[float]] = {}
    for path in score_files:
        table = files.read_parquet(path).select(["scorer", "value"])
        for scorer, value in zip(table["scorer"].to_pylist(), table["value"].to_pylist()):
            if value is not None:
                values.setdefault(scorer, []).append(value)
    return values


def histogram_png(values: dict[str, list[float]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(values), figsize=(3.2 * len(values), 2.4), squeeze=False)
    for ax, (scorer, scores) in zip(axes[0], sorted(values.items())):
        ax.hist(scores, bins=min(20, max(1, len(set(scores)))), color="#3b6fd8")
        ax.set_title(scorer, fontsize=9)
        ax.tick_params(labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def format_report(summary: RunSummary, values: dict[str, list[float]], chart_png: bytes | None) -> str:
    """The run page's markdown report: throughput, error rate, where the time went, score distributions."""
    error_rate = summary.errors / summary.outputs if summary.outputs else 0.0
    requests_per_second = summary.engine_requests / summary.wall_seconds if summary.wall_seconds else 0.0
    lines = [
        f"# {summary.dataset_name} on {summary.model}",
        "",
        "| throughput | error rate | cache |",
        "|---|---|---|",
        f"| {summary.tokens_per_second:.1f} generated tokens/s, {requests_per_second:.2f} requests/s "
        f"| {error_rate:.2%} ({summary.errors} of {summary.outputs}) "
        f"| {summary.cached_shards} of {summary.shards} shards |",
        "",
        "**Seconds per stage:** " + ", ".join(f"{k} {v:.1f}" for k, v in summary.stage_seconds.items()),
        "",
        "## Scores",
        "",
        "| scorer | n | mean | min | max |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {len(v)} | {sum(v) / len(v):.3g} | {min(v):.3g} | {max(v):.3g} |" for name, v in sorted(values.items())
    ]
    if chart_png:
        lines += ["", f"![score distributions](data:image/png;base64,{base64.b64encode(chart_png).decode()})"]
    return "\n".join(lines)


@task(name="publish-report")
def publish_report(summary: RunSummary, score_files: list[str]) -> None:
    values = score_values(score_files)
    create_markdown_artifact(
        key="batch-inference-report",
        markdown=format_report(summary, values, histogram_png(values) if values else None),
        description=f"Run report of {summary.run_id}",
    )


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    version = metadata.version("vllm-batch-flows")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{version}+{commit}" if commit else version
