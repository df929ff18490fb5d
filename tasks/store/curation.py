"""Curation's reads and writes: candidate samples, pushed tasks, pulled annotations, curated versions."""

from __future__ import annotations

import duckdb

from tasks.config import SampleSelection
from tasks.store.rows import AnnotationRow, CuratedVersionRow, LabelTaskRow
from tasks.store.sandbox import select_where, staged
from tasks.store.sql import StoreError, fetch_dicts, insert_rows, transaction

# One row per reviewable answer of a run: canonical requests, no error rows, latest score per scorer.
CANDIDATES_SQL = """
    SELECT o.run_id, o.custom_id, o.output_id, q.prompt, q.messages, o.text AS response,
           o.finish_reason, o.completion_tokens,
           coalesce(s.scores, MAP {{}}::MAP(VARCHAR, DOUBLE)) AS scores
    FROM run_outputs o
    JOIN requests q ON q.dataset_version = o.dataset_version AND q.custom_id = o.custom_id
    LEFT JOIN (
        SELECT output_id, map(list(scorer), list(value)) AS scores
        FROM (SELECT output_id, scorer, arg_max(value, created_at) AS value FROM scores GROUP BY ALL)
        GROUP BY output_id
    ) s ON s.output_id = o.output_id
    WHERE o.run_id = {run} AND o.duplicate_of IS NULL AND o.error_code IS NULL AND o.sample_index = 0
"""
SAMPLE_COLUMNS = "run_id, custom_id, output_id, prompt, messages, response, CAST(to_json(scores) AS VARCHAR) AS scores"


def selection_sql(selection: SampleSelection) -> tuple[str, dict]:
    """The query that returns the chosen samples, ordered, with its parameters."""
    params = {"run": selection.run_id, "scorer": selection.scorer, "limit": selection.limit}
    candidates = f"candidates AS ({CANDIDATES_SQL.format(run='$run')})"
    if selection.strategy == "lowest":
        sql = f"""WITH {candidates}
            SELECT {SAMPLE_COLUMNS} FROM candidates
            ORDER BY scores[$scorer] ASC NULLS LAST, custom_id LIMIT $limit"""
    elif selection.strategy == "stratified":
        params |= {"buckets": selection.buckets, "seed": str(selection.seed)}
        sql = f"""WITH {candidates},
            scored AS (SELECT *, scores[$scorer] AS score FROM candidates WHERE scores[$scorer] IS NOT NULL),
            bucketed AS (
                SELECT *, CASE WHEN max(score) OVER () = min(score) OVER () THEN 0
                    ELSE least(floor((score - min(score) OVER ()) / (max(score) OVER () - min(score) OVER ())
                                     * $buckets), $buckets - 1) END AS bucket
                FROM scored),
            drawn AS (
                SELECT *, row_number() OVER (PARTITION BY bucket ORDER BY md5(custom_id || ':' || $seed)) AS draw
                FROM bucketed)
            SELECT {SAMPLE_COLUMNS} FROM drawn ORDER BY draw, bucket LIMIT $limit"""
    elif selection.strategy == "disagreement":
        params["other"] = selection.other_run_id
        sql = f"""WITH {candidates}, other AS ({CANDIDATES_SQL.format(run="$other")}),
            pairs AS (
                SELECT a.custom_id, abs(a.scores[$scorer] - b.scores[$scorer]) AS gap
                FROM candidates a JOIN other b USING (custom_id)
                WHERE a.response IS DISTINCT FROM b.response
                ORDER BY gap DESC NULLS LAST, custom_id LIMIT $limit),
            both_runs AS (SELECT * FROM candidates UNION ALL SELECT * FROM other)
            SELECT {SAMPLE_COLUMNS} FROM both_runs JOIN pairs USING (custom_id)
            ORDER BY gap DESC NULLS LAST, custom_id, run_id = $other"""
    else:  # where: the candidates only; the user's condition runs in the sandbox (CONDITION_SQL)
        sql = CANDIDATES_SQL.format(run="$run")
    return sql, {name: value for name, value in params.items() if f"${name}" in sql}


# Over the staged candidates, in the sandbox: the one query a user's text goes into.
CONDITION_SQL = "SELECT {columns} FROM candidates WHERE ({where}) ORDER BY custom_id LIMIT $limit"


def select_samples(con: duckdb.DuckDBPyConnection, selection: SampleSelection, timeout_seconds: float = 60.0) -> list[dict]:
    """The chosen samples of a run, in order. A `where` condition runs in the sandbox over the run's
    candidates, never on the results file (see tasks/store/sandbox.py)."""
    if not con.execute("SELECT run_id FROM runs WHERE run_id = ?", [selection.run_id]).fetchall():
        raise StoreError(f"run {selection.run_id!r} is not in this results file")
    sql, params = selection_sql(selection)
    if selection.strategy != "where":
        return fetch_dicts(con, sql, params)
    condition = CONDITION_SQL.format(columns=SAMPLE_COLUMNS, where=selection.where)
    with staged(con, sql, params) as candidates:
        return select_where(
            candidates, condition, {"limit": selection.limit}, f"selection where condition {selection.where!r}", timeout_seconds
        )


def pushed_samples(con: duckdb.DuckDBPyConnection, server_url: str, project_id: int) -> dict[tuple[str, str], int]:
    """(run_id, custom_id) → Label Studio task id of the samples already pushed to this project."""
    rows = con.execute(
        "SELECT run_id, custom_id, task_id FROM label_tasks WHERE server_url = ? AND project_id = ?", [server_url, project_id]
    ).fetchall()
    return {(run_id, custom_id): task_id for run_id, custom_id, task_id in rows}


def record_label_tasks(con: duckdb.DuckDBPyConnection, rows: list[LabelTaskRow]) -> None:
    """Which Label Studio task holds which sample; a known sample keeps its first row."""
    with transaction(con):
        insert_rows(con, "label_tasks", rows)


ANNOTATION_COLUMNS = list(AnnotationRow.model_fields)


def sync_annotations(
    con: duckdb.DuckDBPyConnection, server_url: str, project_id: int, rows: list[AnnotationRow]
) -> dict[str, int]:
    """Make the project's stored annotations equal the pulled ones, in one transaction.

    New ones are inserted, changed ones updated, identical ones left untouched (their pulled_at
    too), and ones deleted in Label Studio removed, so a withdrawn review stops counting.
    """
    columns = ", ".join(ANNOTATION_COLUMNS)
    same = " AND ".join(f"a.{c} IS NOT DISTINCT FROM p.{c}" for c in ANNOTATION_COLUMNS[1:])
    updates = ", ".join(f"{c} = excluded.{c}" for c in ANNOTATION_COLUMNS[1:])
    differs = " OR ".join(f"annotations.{c} IS DISTINCT FROM excluded.{c}" for c in ANNOTATION_COLUMNS[1:])
    with transaction(con):
        con.execute("CREATE TEMP TABLE pulled AS SELECT * EXCLUDE (server_url, pulled_at) FROM annotations LIMIT 0")
        insert_rows(con, "pulled", rows, keep_existing=False)
        new, changed = con.execute(
            f"""SELECT count(*) FILTER (WHERE a.annotation_id IS NULL),
                       count(*) FILTER (WHERE a.annotation_id IS NOT NULL AND NOT ({same}))
                FROM pulled p LEFT JOIN annotations a ON a.server_url = $url AND a.annotation_id = p.annotation_id""",
            {"url": server_url},
        ).fetchall()[0]
        con.execute(
            f"""INSERT INTO annotations (server_url, {columns}, pulled_at)
                SELECT $url, {columns}, current_timestamp FROM pulled
                ON CONFLICT (server_url, annotation_id) DO UPDATE SET {updates}, pulled_at = excluded.pulled_at
                WHERE {differs}""",
            {"url": server_url},
        )
        removed = con.execute(
            """DELETE FROM annotations WHERE server_url = $url AND project_id = $project
               AND annotation_id NOT IN (SELECT annotation_id FROM pulled) RETURNING annotation_id""",
            {"url": server_url, "project": project_id},
        ).fetchall()
        con.execute("DROP TABLE pulled")
    unchanged = len(rows) - new - changed
    return {"pulled": len(rows), "new": new, "changed": changed, "unchanged": unchanged, "removed": len(removed)}


# The latest non-cancelled annotation per sample decides; corrected text wins over the model's text.
CURATED_SQL = """
    WITH latest AS (
        SELECT a.*, row_number() OVER (
            PARTITION BY a.run_id, a.custom_id ORDER BY a.updated_at DESC, a.annotation_id DESC) AS newest
        FROM annotations a
        WHERE NOT a.cancelled
          AND ($project IS NULL OR EXISTS (
              SELECT 1 FROM label_tasks t
              WHERE t.server_url = a.server_url AND t.task_id = a.task_id AND t.project_title = $project))
          AND (len($runs) = 0 OR list_contains($runs, a.run_id))
    )
    SELECT l.run_id, l.custom_id, l.output_id, q.prompt, q.messages, o.text AS model_response,
           l.corrected_text, l.verdict, l.rating, l.annotator, l.annotation_id
    FROM latest l
    JOIN outputs o ON o.output_id = l.output_id
    JOIN runs r ON r.run_id = l.run_id
    JOIN requests q ON q.dataset_version = r.dataset_version AND q.custom_id = l.custom_id
    WHERE l.newest = 1 AND (l.verdict = 'accept' OR nullif(trim(l.corrected_text), '') IS NOT NULL)
    ORDER BY l.run_id, l.custom_id
"""


def curated_rows(con: duckdb.DuckDBPyConnection, project: str | None, run_ids: list[str]) -> list[dict]:
    """The reviewed samples that make a curated dataset: accepted or corrected, newest review first."""
    return fetch_dicts(con, CURATED_SQL, {"project": project, "runs": run_ids})


def record_curated_version(con: duckdb.DuckDBPyConnection, row: CuratedVersionRow) -> None:
    with transaction(con):
        insert_rows(con, "curated_versions", [row])
