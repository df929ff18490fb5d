"""The store's Prefect tasks: each opens the results file, does one named write, and closes it."""

from __future__ import annotations

from prefect import task

from tasks.config import StoreConfig
from tasks.store.commit import RunRecord, commit_run, commit_scores, record_comparison
from tasks.store.connection import writing
from tasks.store.queries import comparison_results


@task(name="commit-results")
def commit_results(record: RunRecord, store: StoreConfig) -> None:
    """The run's one write to the results file: every row it produced, in one transaction."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        commit_run(con, record)


@task(name="commit-scores")
def commit_run_scores(run: dict, score_paths: list[str], store: StoreConfig) -> int:
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        return commit_scores(con, run, score_paths)


@task(name="write-comparison")
def write_comparison(comparison_id: str, runs: dict[str, str], store: StoreConfig) -> tuple[list[dict], list[dict]]:
    """Record which run is which variant, then read the comparison views back."""
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        record_comparison(con, comparison_id, runs)
        return comparison_results(con, comparison_id)
