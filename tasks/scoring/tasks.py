"""Scoring's Prefect tasks: score a run's output shards, or a stored run's outputs again (rescore);
test the differences between the variants of a comparison; judge stored runs (the judge's requests
before its run, its verdicts after)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from blocks import secret_value
from tasks import keys, storage
from tasks.config import StoreConfig
from tasks.engines.base import PER_TOKEN_COLUMNS
from tasks.inference.job import ShardOutput
from tasks.prepare.requests import RequestSet
from tasks.report.summary import RunSummary
from tasks.scoring.compare import BootstrapConfig, difference_record
from tasks.scoring.judge import JudgeConfig, judge_version
from tasks.scoring.judgement import (
    JudgedRuns,
    JudgeRequests,
    judge_dataset,
    judge_requests,
    judgement_id,
    judgement_record,
    verdict_scores,
    verdict_table,
)
from tasks.scoring.registry import resolve_scorers, score_outputs, scorers_version, with_directions
from tasks.scoring.scorers import ScorerSpec
from tasks.store.connection import reading
from tasks.store.queries import judged_answers, paired_values, run_answers, run_outputs_to_score
from tasks.store.rows import ComparisonDifferenceRow, JudgementRow


def outputs_with_requests(output_path: str, request_files: list[str]) -> pa.Table:
    """An output shard joined with what its canonical requests asked (prompt, messages, reference)."""
    files = storage.parquet_dataset([output_path])
    outputs = files.to_table(columns=[name for name in files.schema.names if name not in PER_TOKEN_COLUMNS])
    asked = []
    for path in request_files:
        requests = storage.read_parquet(path, ["request_key", "prompt", "messages", "reference", "duplicate_of"])
        wanted = pc.and_(
            pc.is_null(requests["duplicate_of"]),
            pc.is_in(requests["request_key"], value_set=outputs["request_key"].combine_chunks()),
        )
        asked.append(requests.filter(wanted).drop_columns(["duplicate_of"]))
    return outputs.join(pa.concat_tables(asked), "request_key", join_type="left outer")


def score_path(output: ShardOutput, dataset_version: str, version: str, storage_root: str) -> str:
    """Where an output shard's scores are: one file per shard, scorer set and dataset version (references
    belong to the dataset). A shard with transient errors is computed again by the next run, under the
    same output key: its scores go apart and are never reused, so the answers that replace the errors
    get theirs."""
    key = keys.score_key(output.output_key, dataset_version, version)
    return storage.join(storage_root, "scores", f"{key}-partial.parquet" if output.transient_errors else f"{key}.parquet")


def score_files_of(
    outputs: list[ShardOutput], request_set: RequestSet, specs: list[str | ScorerSpec], storage_root: str
) -> list[str]:
    version = scorers_version(resolve_scorers(specs))
    return [score_path(output, request_set.dataset_version, version, storage_root) for output in outputs]


@task(name="write-scores")
def write_scores(
    outputs: list[ShardOutput], request_set: RequestSet, specs: list[str | ScorerSpec], storage_root: str
) -> list[str]:
    """Score each output shard once per scorer set and dataset version (a shard with transient errors each time)."""
    scorers = resolve_scorers(specs, secret_value)
    paths = []
    for output in outputs:
        path = score_path(output, request_set.dataset_version, scorers_version(scorers), storage_root)
        if output.transient_errors or not storage.exists(path):
            storage.write_parquet(score_outputs(outputs_with_requests(output.path, request_set.request_files), scorers), path)
        elif "direction" not in storage.read_schema(path).names:  # scored before directions were recorded
            storage.write_parquet(with_directions(storage.read_parquet(path), scorers), path)
        paths.append(path)
    return paths


@task(name="write-run-outputs")
def write_run_outputs(run_id: str, store: StoreConfig) -> tuple[dict, str]:
    """Copy a stored run's outputs to a file, so the results file is not held while scorers (a judge) run."""
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        run, table = run_outputs_to_score(con, run_id)
    path = storage.join(store.storage, "rescore", keys.content_hash([run_id, "outputs"]), "outputs.parquet")
    storage.write_parquet(table, path)
    return run, path


@task(name="write-run-scores")
def write_run_scores(outputs_path: str, specs: list[str | ScorerSpec], storage_root: str) -> tuple[str, str, int]:
    """(scorers' version, score file, outputs scored)."""
    scorers = resolve_scorers(specs, secret_value)
    version = scorers_version(scorers)
    outputs = storage.read_parquet(outputs_path)
    path = storage.join(storage_root, "scores", f"rescore-{keys.content_hash([outputs_path, version])}.parquet")
    storage.write_parquet(score_outputs(outputs, scorers), path)
    return version, path, outputs.num_rows


@task(name="compute-differences")
def compute_differences(
    comparison_id: str, variants: list[str], bootstrap: BootstrapConfig, store: StoreConfig
) -> list[ComparisonDifferenceRow]:
    """Per scorer and pair of variants: the paired difference of means, its bootstrap interval and sign test."""
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        groups = paired_values(con, comparison_id, variants)
        return [ComparisonDifferenceRow(**difference_record(comparison_id, group, bootstrap)) for group in groups]


@task(name="write-judge-requests")
def write_judge_requests(runs: JudgedRuns, judge: JudgeConfig, store: StoreConfig) -> JudgeRequests:
    """The judge's prompts over the runs' answers, as a dataset file named by its content (written once)."""
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        answers = judged_answers(con, runs.run_a, runs.run_b)
    requests = judge_requests(answers, runs, judge)
    dataset, path = judge_dataset(requests, storage.join(store.storage, "judge", "requests"), runs, judge)
    if not storage.exists(path):
        storage.write_parquet(requests, path)
    pairs = len(set(zip(requests["custom_id"].to_pylist(), requests["sample_index"].to_pylist())))
    return JudgeRequests(dataset=dataset, path=path, runs=runs, pairs=pairs, requests=requests.num_rows)


@task(name="write-verdicts")
def write_verdicts(
    requests: JudgeRequests, judged: RunSummary, judge: JudgeConfig, store: StoreConfig
) -> tuple[JudgementRow, str, list[str]]:
    """The judge run's answers read as verdicts (a Parquet file), the judgement they add up to, and an
    absolute judge's grades as score rows of the graded answers (a file; none for pairwise)."""
    key = judgement_id(requests.runs, judge, judged.dataset_version, judged.model_fingerprint)
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        answers = run_answers(con, judged.run_id)
    verdicts = verdict_table(key, storage.read_parquet(requests.path), answers, judge)
    path = storage.join(store.storage, "judge", "verdicts", f"{key}.parquet")
    storage.write_parquet(verdicts, path)
    score_paths = []
    if judge.kind == "absolute":
        score_paths.append(storage.join(store.storage, "judge", "scores", f"{key}.parquet"))
        storage.write_parquet(
            verdict_scores(verdicts, requests.runs, judge_version(judge, judged.model_fingerprint)), score_paths[0]
        )
    judgement = judgement_record(key, requests.runs, judge, judged.run_id, judged.model_fingerprint, verdicts)
    return JudgementRow(**judgement), path, score_paths
