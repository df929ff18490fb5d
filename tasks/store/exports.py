"""Exports' reads: one run's outputs, or the newest per input row and model, narrowed by a condition."""

from __future__ import annotations

from collections.abc import Iterator

import duckdb

from tasks import storage
from tasks.config import SpecError
from tasks.store.queries import run_exists

EXPORT_COLUMNS = """
    ro.run_id, r.model, r.dataset_name, ro.dataset_version, ro.custom_id, ro.duplicate_of, ro.sample_index,
    q.prompt, q.messages, q.reference, q.source_file, q.source_row, ro.text, ro.finish_reason,
    ro.prompt_tokens, ro.completion_tokens, ro.error_code, ro.error, ro.output_id, ro.produced_by_run_id,
    o.shard_key, epoch(o.created_at)::BIGINT AS created
"""


def selection_sql(run_id: str | None, where: str | None) -> tuple[str, dict]:
    """The outputs to export: one run's, or the newest per input row and model; narrowed by `where`.

    `where` is a SQL condition over the columns above (e.g. `finish_reason = 'stop' AND output_id IN
    (SELECT output_id FROM scores WHERE scorer = 'judge' AND value >= 8)`).
    """
    sql = f"""
        SELECT * FROM (
            SELECT {EXPORT_COLUMNS}
            FROM run_outputs ro
            JOIN runs r ON r.run_id = ro.run_id
            JOIN requests q ON q.dataset_version = ro.dataset_version AND q.custom_id = ro.custom_id
            JOIN outputs o ON o.output_id = ro.output_id
            WHERE ro.run_id = $run OR $run IS NULL
            QUALIFY $run IS NOT NULL OR row_number() OVER (
                PARTITION BY r.dataset_name, ro.custom_id, r.model, ro.sample_index
                ORDER BY r.started_at DESC, r.run_id DESC) = 1
        )
        WHERE {where or "true"}
        ORDER BY dataset_name, model, custom_id, sample_index
    """
    return sql, {"run": run_id}


def export_selection(con: duckdb.DuckDBPyConnection, run_id: str | None, where: str | None) -> duckdb.DuckDBPyRelation:
    if run_id is not None and not run_exists(con, run_id):
        raise SpecError(f"run {run_id}: not in this results file")
    sql, params = selection_sql(run_id, where)
    try:
        return con.sql(sql, params=params)
    except duckdb.Error as error:
        raise SpecError(f"export filter {where!r}: {error}") from error


def export_rows(con: duckdb.DuckDBPyConnection, run_id: str | None, where: str | None) -> Iterator[dict]:
    """Rows in bounded batches: an export of millions of outputs never sits in memory at once."""
    for batch in export_selection(con, run_id, where).to_arrow_reader(batch_size=10_000):
        yield from batch.to_pylist()


def write_export_parquet(con: duckdb.DuckDBPyConnection, run_id: str | None, where: str | None, path: str) -> int:
    """The selection as one Parquet file (written atomically); returns its rows."""
    relation = export_selection(con, run_id, where)
    with storage.atomic_path(path) as (_, partial):
        relation.write_parquet(partial, compression="zstd")
        return con.execute("SELECT count(*) FROM read_parquet(?)", [partial]).fetchall()[0][0]
