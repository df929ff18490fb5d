"""Exports' read: one run's outputs, or the newest per input row and model, narrowed by a user's condition."""

from __future__ import annotations

import contextlib

from tasks.config import SpecError
from tasks.store.connection import reading
from tasks.store.queries import run_exists
from tasks.store.sandbox import staged, write_where

EXPORT_COLUMNS = """
    ro.run_id, r.model, r.dataset_name, ro.dataset_version, ro.custom_id, ro.duplicate_of, ro.sample_index,
    q.prompt, q.messages, q.reference, q.source_file, q.source_row, ro.text, ro.finish_reason,
    ro.prompt_tokens, ro.completion_tokens, ro.error_code, ro.error, ro.output_id, ro.produced_by_run_id,
    o.shard_key, epoch(o.created_at)::BIGINT AS created, o.token_logprobs, o.prompt_logprobs,
    ro.reasoning, ro.reasoning_tokens, ro.text_tokens, ro.reasoning_truncated,
    coalesce(s.scores, MAP {}::MAP(VARCHAR, DOUBLE)) AS scores
"""

# The candidates of an export, with no user text in it: one run's outputs, or the newest per input
# row and model; `scores` (latest value per scorer) is there for conditions and not exported.
SELECTION_SQL = f"""
    SELECT {EXPORT_COLUMNS}
    FROM run_outputs ro
    JOIN runs r ON r.run_id = ro.run_id
    JOIN requests q ON q.dataset_version = ro.dataset_version AND q.custom_id = ro.custom_id
    JOIN outputs o ON o.output_id = ro.output_id
    LEFT JOIN (
        SELECT output_id, map(list(scorer), list(value)) AS scores
        FROM (SELECT output_id, scorer, arg_max(value, created_at) AS value FROM scores GROUP BY ALL)
        GROUP BY output_id
    ) s ON s.output_id = ro.output_id
    WHERE ro.run_id = $run OR $run IS NULL
    QUALIFY $run IS NOT NULL OR row_number() OVER (
        PARTITION BY r.dataset_name, ro.custom_id, r.model, ro.sample_index
        ORDER BY r.started_at DESC, r.run_id DESC) = 1
"""

# Over the staged candidates, in the sandbox: the one query a user's text goes into.
CONDITION_SQL = """
    SELECT * EXCLUDE (scores) FROM candidates WHERE ({where})
    ORDER BY dataset_name, model, custom_id, sample_index
"""


def write_export_selection(
    duckdb_path: str, lock_timeout_seconds: float, run_id: str | None, where: str | None, timeout_seconds: float, path: str
) -> int:
    """The rows to export as a local Parquet file, ordered by request; returns their count.

    The results file is open (read-only) only while the fixed selection is copied out; `where` runs
    afterwards in the sandbox, so a commit never waits for the condition or for the export's files.
    """
    with contextlib.ExitStack() as stack:
        with reading(duckdb_path, lock_timeout_seconds) as con:
            if run_id is not None and not run_exists(con, run_id):
                raise SpecError(f"run {run_id}: not in this results file")
            candidates = stack.enter_context(staged(con, SELECTION_SQL, {"run": run_id}))
        condition = CONDITION_SQL.format(where=where or "true")
        return write_where(candidates, condition, f"export filter {where!r}", timeout_seconds, path)


# The lines of a run that have no output row: rejected at preparation (with their reason), or never
# answered because the run stopped early (cancelled, expired) — each is a line of the error file.
BATCH_GAPS_SQL = """
    SELECT coalesce(x.custom_id, 'line-' || (x.source_row + 1)) AS custom_id, 'invalid_request' AS code, x.reason AS message
    FROM rejected_rows x JOIN runs r ON r.dataset_version = x.dataset_version
    WHERE r.run_id = $run
    UNION ALL
    SELECT q.custom_id, NULL AS code, NULL AS message
    FROM requests q JOIN runs r ON r.dataset_version = q.dataset_version
    WHERE r.run_id = $run AND q.custom_id NOT IN (SELECT custom_id FROM run_outputs WHERE run_id = $run)
    ORDER BY custom_id
"""


def write_batch_selection(duckdb_path: str, lock_timeout_seconds: float, run_id: str, selection: str, gaps: str) -> None:
    """A batch run's outputs (`selection`, as an export's) and its lines without one (`gaps`), as local Parquet files."""
    with reading(duckdb_path, lock_timeout_seconds) as con:
        if not run_exists(con, run_id):
            raise SpecError(f"run {run_id}: not in this results file")
        con.sql(
            SELECTION_SQL + " ORDER BY r.dataset_name, r.model, ro.custom_id, ro.sample_index", params={"run": run_id}
        ).write_parquet(selection)
        con.sql(BATCH_GAPS_SQL, params={"run": run_id}).write_parquet(gaps)
