"""The store's Prefect tasks: each opens the results file, does one named write, and closes it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import task
from prefect.exceptions import TerminationSignal

from tasks.config import StoreConfig
from tasks.store.commit import (
    CommitFiles,
    RunRecord,
    begin_run,
    commit_run,
    commit_scores,
    commit_shard,
    finish_run,
    mark_run,
    record_comparison,
    record_differences,
    record_judgement,
)
from tasks.store.connection import reading, writing
from tasks.store.queries import comparison_results
from tasks.store.rows import ComparisonDifferenceRow, DatasetVersionRow, JudgementRow, RunRow, RunShardRow


@task(name="commit-run-start")
def commit_run_start(run: RunRow, dataset: DatasetVersionRow, files: CommitFiles, store: StoreConfig) -> None:
    """The run's row (running), its dataset version, requests and rejected rows: queryable before any answer."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        begin_run(con, run, dataset, files)


@task(name="commit-shard")
def commit_shard_results(run: RunRow, shard: RunShardRow, counts: dict[str, int], files: CommitFiles, store: StoreConfig) -> None:
    """A finished shard's outputs and scores, while the run goes on: one short transaction."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        commit_shard(con, run, shard, counts, files)


@task(name="commit-run-end")
def commit_run_end(run: RunRow, store: StoreConfig) -> None:
    """The run's final row: its status and totals."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        finish_run(con, run)


@task(name="mark-run-stopped")
def mark_run_stopped(run_id: str, status: str, store: StoreConfig) -> None:
    """A run that stopped early (failed, cancelled) keeps what its shards committed and says how it ended."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        mark_run(con, run_id, status)


@contextmanager
def marked_if_stopped(run_id: str, store: StoreConfig) -> Iterator[None]:
    """A block whose failure or interruption ends the run's row as failed or cancelled, then goes on."""
    try:
        yield
    except (KeyboardInterrupt, TerminationSignal):
        mark_run_stopped(run_id, "cancelled", store)
        raise
    except BaseException:
        mark_run_stopped(run_id, "failed", store)
        raise


@task(name="commit-results")
def commit_results(record: RunRecord, store: StoreConfig) -> None:
    """A whole run in one transaction (runs recorded after the fact, e.g. by a benchmark or an import)."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        commit_run(con, record)


@task(name="commit-scores")
def commit_run_scores(run: dict, score_paths: list[str], store: StoreConfig) -> int:
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        return commit_scores(con, run, score_paths)


@task(name="write-comparison")
def write_comparison(comparison_id: str, runs: dict[str, str], store: StoreConfig) -> None:
    """Record which run is which variant: the comparison views then show it."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        record_comparison(con, comparison_id, runs)


@task(name="write-differences")
def write_differences(rows: list[ComparisonDifferenceRow], store: StoreConfig) -> None:
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        record_differences(con, rows)


@task(name="read-comparison")
def read_comparison(comparison_id: str, store: StoreConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """The comparison's rows of comparison_scores, comparison_win_rates and comparison_differences."""
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        return comparison_results(con, comparison_id)


@task(name="commit-judgement")
def commit_judgement(judgement: JudgementRow, verdict_paths: list[str], score_paths: list[str], store: StoreConfig) -> None:
    """A judgement and its verdicts (and an absolute judge's scores), in place of the same judgement's earlier rows."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        record_judgement(con, judgement, verdict_paths, score_paths)
