"""Named reads of runs, outputs and comparisons: what the other subsystems ask the results file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import duckdb
import pyarrow as pa

from tasks.store.connection import connect_waiting, open_for_read
from tasks.store.sql import StoreError, fetch_dicts


def has_column(con: duckdb.DuckDBPyConnection, table: str, column: str) -> bool:
    found = con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?", [table, column]
    ).fetchall()
    return found[0][0] > 0


def answered_before(duckdb_path: str, input_fingerprint: str, model_fingerprint: str, sampling_hash: str) -> bool:
    """Whether a committed run already answered this very input with this model and sampling.

    A peek, never a wait: a file that is missing, older or held by another process answers False.
    """
    if not Path(duckdb_path).is_file():
        return False
    try:
        con = connect_waiting(duckdb_path, read_only=True, lock_timeout_seconds=0)
    except StoreError:
        return False
    try:
        if not has_column(con, "runs", "input_fingerprint"):  # written before migration 6
            return False
        completed = "AND status = 'completed'" if has_column(con, "runs", "status") else ""  # before migration 8: all were
        found = con.execute(
            f"SELECT count(*) FROM runs WHERE input_fingerprint = ? AND model_fingerprint = ? AND sampling_hash = ? {completed}",
            [input_fingerprint, model_fingerprint, sampling_hash],
        ).fetchall()
    finally:
        con.close()
    return found[0][0] > 0


def answered_keys(
    duckdb_path: str, model_fingerprint: str, sampling_hash: str, lock_timeout_seconds: float = 60.0
) -> pa.Array | None:
    """Request keys answered for this model and sampling (None when there is no file yet): by an
    answer or by a permanent error; a transient error is asked again."""
    if not Path(duckdb_path).is_file():
        return None
    con = open_for_read(duckdb_path, lock_timeout_seconds)
    try:
        keys = con.sql(
            "SELECT DISTINCT request_key FROM outputs WHERE model_fingerprint = ? AND sampling_hash = ? "
            "AND error_kind IS DISTINCT FROM 'transient'",
            params=[model_fingerprint, sampling_hash],
        ).to_arrow_table()["request_key"]
    finally:
        con.close()
    return keys.combine_chunks() if len(keys) else None


# What a rerun asks again: answers cut off inside the thinking, or any answer cut off at max_tokens.
CUT_OFF_CONDITIONS = {"reasoning": "ro.reasoning_truncated", "length": "ro.finish_reason = 'length'"}


def cut_off_keys(duckdb_path: str, run_id: str, cut_off: str, lock_timeout_seconds: float = 60.0) -> pa.Array:
    """The request keys of a run's canonical requests whose answers were cut off (any sample of them)."""
    with closing(open_for_read(duckdb_path, lock_timeout_seconds)) as con:
        keys = con.sql(
            f"SELECT DISTINCT ro.request_key FROM run_outputs ro WHERE ro.run_id = ? AND ro.duplicate_of IS NULL "
            f"AND {CUT_OFF_CONDITIONS[cut_off]}",
            params=[run_id],
        ).to_arrow_table()["request_key"]
    return keys.combine_chunks() if len(keys) else pa.array([], pa.string())


def rerun_source(duckdb_path: str, run_id: str, cut_off: str, lock_timeout_seconds: float = 60.0) -> dict:
    """What a rerun of `run_id` starts from: the run's dataset spec, model and sampling as recorded, how
    many of its answers were cut off, and the largest token budget one of their rows set for itself."""
    with closing(open_for_read(duckdb_path, lock_timeout_seconds)) as con:
        found = fetch_dicts(
            con,
            f"""
            SELECT r.run_id, r.engine_args, r.sampling_params, d.spec,
                   count(ro.output_id) FILTER (WHERE {CUT_OFF_CONDITIONS[cut_off]}) AS cut_off,
                   max(TRY_CAST(json_extract_string(q.overrides, '$.max_tokens') AS INTEGER))
                       FILTER (WHERE {CUT_OFF_CONDITIONS[cut_off]}) AS largest_row_budget
            FROM runs r
            JOIN dataset_versions d ON d.dataset_version = r.dataset_version
            LEFT JOIN run_outputs ro ON ro.run_id = r.run_id AND ro.duplicate_of IS NULL
            LEFT JOIN requests q ON q.dataset_version = ro.dataset_version AND q.custom_id = ro.custom_id
            WHERE r.run_id = ?
            GROUP BY ALL
            """,
            [run_id],
        )
    if not found:
        raise StoreError(f"run {run_id}: not in this results file")
    return found[0]


def run_keys(con: duckdb.DuckDBPyConnection, run_id: str) -> dict:
    """What identifies a stored run's outputs: its id, model fingerprint and sampling hash."""
    found = fetch_dicts(con, "SELECT run_id, model_fingerprint, sampling_hash FROM runs WHERE run_id = ?", [run_id])
    if not found:
        raise StoreError(f"run {run_id}: not in this results file")
    return found[0]


def run_outputs_to_score(con: duckdb.DuckDBPyConnection, run_id: str) -> tuple[dict, pa.Table]:
    """A run's keys and its unique outputs with what their requests asked: the input of scoring, without inference."""
    run = run_keys(con, run_id)
    table = con.sql(
        """
        SELECT o.request_key, o.sample_index, o.text, o.finish_reason, o.prompt_tokens, o.completion_tokens,
               o.error_code, o.error, o.mean_logprob, q.prompt, q.messages, q.reference
        FROM run_outputs ro
        JOIN outputs o ON o.output_id = ro.output_id
        JOIN requests q ON q.dataset_version = ro.dataset_version AND q.custom_id = ro.custom_id
        WHERE ro.run_id = ? AND ro.duplicate_of IS NULL
        ORDER BY o.request_key, o.sample_index
        """,
        params=[run_id],
    ).to_arrow_table()
    return run, table


def comparison_results(con: duckdb.DuckDBPyConnection, comparison_id: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(rows of comparison_scores, of comparison_win_rates, of comparison_differences) of one comparison."""
    scores = fetch_dicts(
        con, "SELECT * FROM comparison_scores WHERE comparison_id = ? ORDER BY scorer, scorer_version, variant", [comparison_id]
    )
    win_rates = fetch_dicts(
        con, "SELECT * FROM comparison_win_rates WHERE comparison_id = ? ORDER BY scorer, variant_a, variant_b", [comparison_id]
    )
    differences = fetch_dicts(
        con,
        "SELECT * EXCLUDE (created_at) FROM comparison_differences WHERE comparison_id = ? "
        "ORDER BY scorer, scorer_version, variant_a, variant_b",
        [comparison_id],
    )
    return scores, win_rates, differences


def paired_values(con: duckdb.DuckDBPyConnection, comparison_id: str, variants: list[str]) -> Iterator[dict]:
    """Per scorer and pair of variants (a before b in `variants`' order): the two lists of values, paired
    by request and sample. One group at a time, so a large comparison is never all in memory."""
    relation = con.sql(
        """
        SELECT variant_a, variant_b, scorer, scorer_version, any_value(direction) AS direction,
               list(value_a ORDER BY custom_id, sample_index) AS values_a,
               list(value_b ORDER BY custom_id, sample_index) AS values_b
        FROM comparison_pairs
        WHERE comparison_id = $id AND list_position($variants, variant_a) < list_position($variants, variant_b)
        GROUP BY variant_a, variant_b, scorer, scorer_version
        ORDER BY scorer, scorer_version, list_position($variants, variant_a), list_position($variants, variant_b)
        """,
        params={"id": comparison_id, "variants": variants},
    )
    for batch in relation.to_arrow_reader(1):
        yield from batch.to_pylist()


def judged_answers(con: duckdb.DuckDBPyConnection, run_a: str, run_b: str | None) -> pa.Table:
    """Run a's answers (canonical requests, no errors) with what their requests asked, and b's answer to the
    same request and sample (by custom_id): only the pairs both answered when run_b is given."""
    for run_id in filter(None, (run_a, run_b)):
        run_keys(con, run_id)  # a run that is not in the file is a clear error, not an empty judgement
    return con.sql(
        f"""
        WITH a AS (
            SELECT ro.custom_id, ro.sample_index, ro.output_id, ro.text, q.prompt, q.messages, q.reference
            FROM run_outputs ro
            JOIN requests q ON q.dataset_version = ro.dataset_version AND q.custom_id = ro.custom_id
            WHERE ro.run_id = $a AND ro.duplicate_of IS NULL AND ro.error_code IS NULL
        ), b AS (
            SELECT custom_id, sample_index, output_id, text FROM run_outputs
            WHERE run_id = $b AND duplicate_of IS NULL AND error_code IS NULL
        )
        SELECT a.custom_id, a.sample_index, a.prompt, a.messages, a.reference,
               a.output_id AS output_id_a, a.text AS text_a, b.output_id AS output_id_b, b.text AS text_b
        FROM a {"JOIN" if run_b else "LEFT JOIN"} b ON b.custom_id = a.custom_id AND b.sample_index = a.sample_index
        ORDER BY a.custom_id, a.sample_index
        """,
        params={"a": run_a, "b": run_b},
    ).to_arrow_table()


def run_answers(con: duckdb.DuckDBPyConnection, run_id: str) -> pa.Table:
    """A run's first answer (or error) to each of its requests, duplicates included: (custom_id, output_id, text, error_code)."""
    return con.sql(
        "SELECT custom_id, output_id, text, error_code FROM run_outputs WHERE run_id = ? AND sample_index = 0",
        params=[run_id],
    ).to_arrow_table()


def run_exists(con: duckdb.DuckDBPyConnection, run_id: str) -> bool:
    return bool(con.execute("SELECT run_id FROM runs WHERE run_id = ?", [run_id]).fetchall())


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """A user's query (`vbf sql`), on the connection given (read-only there)."""
    relation = con.sql(sql)  # None for a statement that returns nothing (SET, PRAGMA ...)
    return relation.to_arrow_table() if relation is not None else pa.table({})


def newest_run_progress(duckdb_path: str, dataset_name: str, lock_timeout_seconds: float) -> dict | None:
    """The newest run of a dataset — its id, its status, and its input lines answered (`completed`) or
    failed so far, with their tokens — or None before it starts (or before the file exists)."""
    if not Path(duckdb_path).is_file():
        return None
    with closing(open_for_read(duckdb_path, lock_timeout_seconds)) as con:
        rows = fetch_dicts(
            con,
            """
            WITH run AS (SELECT run_id, status FROM runs WHERE dataset_name = ? ORDER BY started_at DESC LIMIT 1)
            SELECT run.run_id, run.status,
                   count(DISTINCT ro.custom_id) FILTER (WHERE ro.error_code IS NULL) AS completed,
                   count(DISTINCT ro.custom_id) FILTER (WHERE ro.error_code IS NOT NULL) AS failed,
                   coalesce(sum(ro.prompt_tokens) FILTER (WHERE ro.sample_index = 0), 0)::BIGINT AS prompt_tokens,
                   coalesce(sum(ro.completion_tokens), 0)::BIGINT AS completion_tokens
            FROM run LEFT JOIN run_outputs ro ON ro.run_id = run.run_id
            GROUP BY ALL
            """,
            [dataset_name],
        )
    return rows[0] if rows else None


def generation_rate(duckdb_path: str, model_fingerprint: str, lock_timeout_seconds: float = 60.0) -> float | None:
    """Output tokens per engine second of the earlier runs of this model (its fingerprint) that generated any."""
    if not Path(duckdb_path).is_file():
        return None
    with closing(open_for_read(duckdb_path, lock_timeout_seconds)) as con:
        tokens, seconds = con.execute(
            """SELECT sum(generated_tokens), sum(TRY_CAST(json_extract_string(stage_seconds, '$.generate') AS DOUBLE))
               FROM runs WHERE model_fingerprint = ? AND generated_tokens > 0""",
            [model_fingerprint],
        ).fetchall()[0]
    return tokens / seconds if tokens and seconds else None
