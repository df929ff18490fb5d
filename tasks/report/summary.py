"""The run summary: a pydantic record the flow returns, the `runs` row it becomes, and a terminal table;
a judgement's lines on the terminal."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from tasks.config import DatasetSpec
from tasks.inference.job import InferenceJob, ShardOutput
from tasks.prepare.requests import RequestSet
from tasks.redact import redact
from tasks.store.commit import CommitFiles
from tasks.store.rows import DatasetVersionRow, JudgementRow, RunCounts, RunRow, RunShardRow


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

    @contextmanager
    def adding(self, stage: str) -> Iterator[None]:
        """A stage that comes in pieces (each finished shard's scoring): its seconds add up."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 3)

    def total(self) -> float:
        return time.perf_counter() - self.started


class RunSummary(RunCounts):
    """What `batch_inference` returns: the run's counts, where its time went, and where its results are."""

    run_id: str
    dataset_name: str
    dataset_version: str
    model: str
    engine: str
    model_fingerprint: str
    stage_seconds: dict[str, float]  # prepare, shard, infer (of which engine_start, generate, score, commit_shards), commit
    duckdb_path: str


def summarize_run(
    run_id: str,
    dataset_name: str,
    job: InferenceJob,
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
        model=job.model.model,
        engine=job.model.engine,
        model_fingerprint=job.model_fingerprint,
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
        transient_errors=sum(output.transient_errors for output in outputs),
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
    "transient_errors": "of which transient (asked again next run)",
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
        f'  {vbf_command()} sql --duckdb {summary.duckdb_path} "SELECT custom_id, finish_reason, '
        f"completion_tokens, left(text, 40) AS text FROM run_outputs WHERE run_id = '{summary.run_id}' LIMIT 10\"",
    ]
    return "\n".join(lines)


def run_row(
    counts: RunCounts,
    run_id: str,
    dataset: DatasetSpec,
    job: InferenceJob,
    scorers: str,
    request_set: RequestSet,
    started_at: datetime,
    status: str,
    stage_seconds: dict[str, float] | None = None,
    rerun_of: str | None = None,
) -> RunRow:
    """The run's `runs` row: what was asked, what it cost so far, and how it stands."""
    return RunRow(
        **counts.model_dump(include=set(RunCounts.model_fields)),
        run_id=run_id,
        dataset_version=request_set.dataset_version,
        dataset_name=dataset.name,
        model=job.model.model,
        model_fingerprint=job.model_fingerprint,
        engine=job.model.engine,
        engine_args=job.model.model_dump_json(),
        stage_seconds=json.dumps(stage_seconds or {}),
        sampling_params=job.sampling.model_dump_json(),
        sampling_hash=job.sampling_hash,
        template_hash=request_set.template_hash,
        input_fingerprint=request_set.input_fingerprint,
        fan_out=dataset.dedupe.fan_out,
        scorers=scorers,
        code_version=code_version(),
        started_at=started_at,
        finished_at=None if status == "running" else datetime.now(timezone.utc),
        status=status,
        rerun_of=rerun_of,
    )


def counts_at_start(request_set: RequestSet, shards: int, reused_requests: int) -> RunCounts:
    """A run's counts before its first shard: what preparing found, nothing answered yet."""
    zero = dict.fromkeys(["cached_shards", "engine_requests", "outputs", "errors", "prompt_tokens", "completion_tokens"], 0)
    return RunCounts(
        rows_read=request_set.rows_read,
        rejected=request_set.rejected,
        requests=request_set.requests,
        unique_requests=request_set.unique_requests,
        duplicates=request_set.duplicates,
        shards=shards,
        reused_requests=reused_requests,
        generated_tokens=0,
        tokens_per_second=0.0,
        wall_seconds=0.0,
        **zero,
    )


def dataset_version_row(dataset: DatasetSpec, request_set: RequestSet) -> DatasetVersionRow:
    return DatasetVersionRow(
        dataset_version=request_set.dataset_version,
        dataset_name=dataset.name,
        source=redact(dataset.source),
        spec=dataset.model_dump_json(),
        template_hash=request_set.template_hash,
        rows_read=request_set.rows_read,
        requests=request_set.requests,
        unique_requests=request_set.unique_requests,
        rejected=request_set.rejected,
    )


def input_files(request_set: RequestSet) -> CommitFiles:
    return CommitFiles(requests=request_set.request_files, rejected=request_set.rejected_files, outputs=[], scores=[])


def shard_row(run_id: str, output: ShardOutput, cached: bool) -> RunShardRow:
    return RunShardRow(
        run_id=run_id, cached=cached, committed_at=datetime.now(timezone.utc), **output.model_dump(exclude={"path", "outputs"})
    )


def shard_counts(output: ShardOutput, cached: bool) -> dict[str, int]:
    """What a finished shard adds to its run's live counts (a cached shard computed nothing in this run)."""
    counts = output.model_dump(include={"outputs", "errors", "transient_errors", "prompt_tokens", "completion_tokens"})
    if cached:
        return {**counts, "engine_requests": 0, "generated_tokens": 0}
    return {**counts, "engine_requests": output.engine_requests, "generated_tokens": output.completion_tokens}


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


def vbf_command() -> str:
    """How to call `vbf` from here: the script beside this Python (`.venv/bin/vbf`), or `vbf` on the PATH."""
    script = Path(sys.executable).parent / "vbf"
    try:
        return str(script.relative_to(Path.cwd())) if script.exists() else "vbf"
    except ValueError:
        return str(script)


def format_judgement(judgement: JudgementRow, judge_run: RunSummary) -> str:
    """The judgement on the terminal: its numbers, what the judge run computed, and where the verdicts are."""

    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    b = {"run": judgement.run_b, "reference": "the reference answers", "none": "–"}[judgement.against]
    lines = [
        f"{judgement.kind} judgement {judgement.judgement_id} — a: {judgement.run_a}, b: {b}",
        f"  pairs {judgement.pairs} (a wins {judgement.a_wins}, b wins {judgement.b_wins}, ties {judgement.ties}; "
        f"unjudged {judgement.unjudged}), unparseable verdicts {judgement.unparseable}",
        f"  win rate of a {number(judgement.win_rate)} [{number(judgement.win_rate_ci95_low)}, "
        f"{number(judgement.win_rate_ci95_high)}], sign test p {number(judgement.p_value)}",
        f"  position bias {number(judgement.position_bias)}, first shown chosen {number(judgement.first_position_rate)}, "
        f"mean score a {number(judgement.mean_score_a)}, b {number(judgement.mean_score_b)}",
        f"  judge run {judge_run.run_id}: {judge_run.engine_requests} requests sent to {judge_run.model}, "
        f"{judge_run.reused_requests} answered before",
        "",
        "Try next:",
        f'  {vbf_command()} sql --duckdb {judge_run.duckdb_path} "SELECT * FROM judge_verdicts '
        f"WHERE judgement_id = '{judgement.judgement_id}' LIMIT 10\"",
    ]
    return "\n".join(lines)
