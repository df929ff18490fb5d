"""Typed rows of the tables written one row at a time (bulk rows come as Parquet files; see `commit`).

Their field names are the column names: `sql.insert_rows` writes them as they are, and tests build
rows from them instead of typing dicts by hand.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class DatasetVersionRow(BaseModel):
    dataset_version: str
    dataset_name: str
    source: str
    spec: str  # JSON
    template_hash: str
    rows_read: int
    requests: int
    unique_requests: int
    rejected: int


class RunCounts(BaseModel):
    """What a run did, in numbers: the summary a flow returns and its `runs` row share these."""

    rows_read: int
    rejected: int
    requests: int
    unique_requests: int
    duplicates: int
    shards: int
    cached_shards: int
    engine_requests: int  # requests this run sent to the engine
    reused_requests: int = 0  # unique requests answered by outputs already in the file
    outputs: int
    errors: int
    transient_errors: int = 0  # of the errors: the server's passing trouble; the next run asks again
    prompt_tokens: int
    completion_tokens: int
    generated_tokens: int  # completion tokens computed by this run (not from cache)
    tokens_per_second: float  # generated tokens per second of the run's wall time
    wall_seconds: float


class RunRow(RunCounts):
    run_id: str
    dataset_version: str
    dataset_name: str
    model: str
    model_fingerprint: str
    engine: str
    engine_args: str  # JSON
    sampling_params: str  # JSON
    sampling_hash: str
    template_hash: str
    scorers: str
    code_version: str
    started_at: datetime
    finished_at: datetime | None = None  # None while it runs
    status: str = "completed"  # running, completed, failed, cancelled
    stage_seconds: str = "{}"  # JSON
    input_fingerprint: str | None = None
    fan_out: bool = True
    rerun_of: str | None = None  # the run whose cut-off answers this run asks again


class RunShardRow(BaseModel):
    run_id: str
    shard_key: str
    output_key: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    generate_seconds: float
    transient_errors: int = 0
    cached: bool
    batch_size: int | None = None
    max_num_seqs: int | None = None
    engine_load_seconds: float | None = None
    committed_at: datetime | None = None


class ComparisonRow(BaseModel):
    comparison_id: str
    variant: str
    run_id: str


class LabelTaskRow(BaseModel):
    server_url: str
    project_id: int
    project_title: str
    run_id: str
    custom_id: str
    output_id: str
    task_id: int
    strategy: str


class CuratedVersionRow(BaseModel):
    curated_version: str
    name: str
    content_hash: str
    source_runs: str  # JSON
    examples: int
    accepted: int
    corrected: int
    path: str


class AnnotationRow(BaseModel):
    """One reviewer's annotation of a pushed sample, as pulled from Label Studio."""

    annotation_id: int
    task_id: int
    project_id: int | None
    run_id: str
    custom_id: str
    output_id: str | None
    annotator: str | None
    verdict: str | None  # accept, reject; None when skipped
    rating: int | None
    corrected_text: str | None
    cancelled: bool
    created_at: str | None  # ISO time as Label Studio gives it
    updated_at: str | None


class ComparisonDifferenceRow(BaseModel):
    """A paired difference of means (b − a) of two variants for one scorer, with its bootstrap interval and sign test."""

    comparison_id: str
    variant_a: str
    variant_b: str
    scorer: str
    scorer_version: str
    direction: str
    pairs: int
    mean_a: float
    mean_b: float
    mean_diff: float
    diff_ci95_low: float
    diff_ci95_high: float
    b_higher: int
    a_higher: int
    p_value: float
    resamples: int
    seed: int


class JudgementRow(BaseModel):
    """What an LLM judge made of two runs' answers (or one run's): the judge run, and the numbers its verdicts add up to."""

    judgement_id: str
    kind: str  # pairwise, absolute
    run_a: str
    run_b: str | None
    against: str  # run, reference, none
    judge_run_id: str
    judge_model: str
    judge_model_fingerprint: str
    judge_sampling_hash: str
    verdict_format: str
    rubric_hash: str
    judge_version: str  # as the `judge` scorer's scorer_version for the same judge
    requests: int
    pairs: int
    unjudged: int
    unparseable: int
    judge_errors: int
    a_wins: int
    b_wins: int
    ties: int
    inconsistent: int | None
    position_bias: float | None
    first_position_rate: float | None
    mean_score_a: float | None
    mean_score_b: float | None
    win_rate: float | None
    win_rate_ci95_low: float | None
    win_rate_ci95_high: float | None
    p_value: float | None
