"""Writes: a run as it goes (its start, each finished shard, its end), a whole run at once, and scores
added to a stored run.

Every insert ignores rows that are already there, so committing the same shard (or the same run)
twice changes nothing, and a failure anywhere rolls that commit back. A shard's commit is one short
transaction, so readers wait for it at most that long. The one row a commit replaces is a transient
error (a timeout, a 429 or 5xx after the retries): a later run asked again, and its answer takes the
error's place (and its scores' place). A judgement replaces its own rows, and an absolute judge its
grades of the same answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb

from tasks import storage
from tasks.store.rows import ComparisonDifferenceRow, ComparisonRow, DatasetVersionRow, JudgementRow, RunRow, RunShardRow
from tasks.store.sql import StoreError, fetch_value, insert_rows, transaction


@dataclass(frozen=True)
class CommitFiles:
    """The Parquet files a run's rows come from."""

    requests: list[str]
    rejected: list[str]
    outputs: list[str]
    scores: list[str]


@dataclass(frozen=True)
class RunRecord:
    """Everything a finished run writes: its row, its dataset version, its shards, and the files of its rows."""

    run: RunRow
    dataset: DatasetVersionRow
    shards: list[RunShardRow]
    files: CommitFiles


# output_id identifies one answer by content: which request, which model, which sampling, which sample.
OUTPUT_ID_SQL = "md5(concat_ws(':', {t}.request_key, $fp, $sh, CAST({t}.sample_index AS VARCHAR)))"

# The run's counters a finished shard adds to while the run goes (its final row then sets them all).
LIVE_COUNTS = (
    "outputs",
    "errors",
    "transient_errors",
    "prompt_tokens",
    "completion_tokens",
    "engine_requests",
    "generated_tokens",
)


@contextmanager
def parquet_files(con: duckdb.DuckDBPyConnection, name: str, paths: list[str]) -> Iterator[str]:
    """The files as one table `name` for the block's queries, read through Arrow and fsspec, so a
    storage URL (s3://...) reads as a local folder does: DuckDB opens no URL without its httpfs extension."""
    con.register(name, storage.parquet_dataset(paths))
    try:
        yield name
    finally:
        con.unregister(name)


def begin_run(con: duckdb.DuckDBPyConnection, run: RunRow, dataset: DatasetVersionRow, files: CommitFiles) -> None:
    """Before inference: the dataset version, its requests and rejected rows, and the run's row (status running)."""
    with transaction(con):
        insert_inputs(con, dataset, files)
        insert_rows(con, "runs", [run])


def commit_shard(
    con: duckdb.DuckDBPyConnection, run: RunRow, shard: RunShardRow, counts: dict[str, int], files: CommitFiles
) -> None:
    """A finished shard's outputs and scores, its run_shards row, and the run's live counts, in one transaction.

    A shard committed before (same run and shard key) changes nothing, its counts included.
    """
    with transaction(con):
        if fetch_value(con, "SELECT count(*) FROM run_shards WHERE run_id = ? AND shard_key = ?", [run.run_id, shard.shard_key]):
            return
        insert_outputs(con, run, files.outputs)
        insert_scores(con, run.run_id, run.model_fingerprint, run.sampling_hash, files.scores)
        insert_rows(con, "run_shards", [shard])
        assignments = ", ".join(f"{name} = {name} + ${name}" for name in LIVE_COUNTS)
        con.execute(
            f"UPDATE runs SET {assignments}, cached_shards = cached_shards + $cached WHERE run_id = $run",
            {**{name: counts.get(name, 0) for name in LIVE_COUNTS}, "cached": int(shard.cached), "run": run.run_id},
        )


def finish_run(con: duckdb.DuckDBPyConnection, run: RunRow) -> None:
    """The run's final row (status, totals, finished_at) in place of its live one."""
    values = run.model_dump(exclude={"run_id"})
    with transaction(con):
        con.execute(
            f"UPDATE runs SET {', '.join(f'{name} = ${name}' for name in values)} WHERE run_id = $run_id",
            {**values, "run_id": run.run_id},
        )


def mark_run(con: duckdb.DuckDBPyConnection, run_id: str, status: str) -> None:
    """End a run that stopped early (failed, cancelled) with the counts its committed shards left."""
    with transaction(con):
        con.execute(
            "UPDATE runs SET status = ?, finished_at = now(), "
            "wall_seconds = epoch(now()) - epoch(started_at) WHERE run_id = ? AND status = 'running'",
            [status, run_id],
        )


def commit_run(con: duckdb.DuckDBPyConnection, record: RunRecord) -> None:
    """Write a run and everything it produced in one transaction."""
    run, files = record.run, record.files
    with transaction(con):
        insert_inputs(con, record.dataset, files)
        insert_outputs(con, run, files.outputs)
        insert_scores(con, run.run_id, run.model_fingerprint, run.sampling_hash, files.scores)
        insert_rows(con, "run_shards", record.shards)
        insert_rows(con, "runs", [run])


def insert_inputs(con: duckdb.DuckDBPyConnection, dataset: DatasetVersionRow, files: CommitFiles) -> None:
    insert_rows(con, "dataset_versions", [dataset])
    if files.requests:
        with parquet_files(con, "request_files", files.requests):
            con.execute(
                "INSERT INTO requests BY NAME SELECT $dv AS dataset_version, custom_id, request_key, prompt, "
                "messages, duplicate_of, source_file, source_row, overrides, reference "
                "FROM request_files ON CONFLICT DO NOTHING",
                {"dv": dataset.dataset_version},
            )
    if files.rejected:
        with parquet_files(con, "rejected_files", files.rejected):
            con.execute(
                "INSERT INTO rejected_rows BY NAME SELECT $dv AS dataset_version, source_file, source_row, "
                "custom_id, field, reason FROM rejected_files ON CONFLICT DO NOTHING",
                {"dv": dataset.dataset_version},
            )


def insert_outputs(con: duckdb.DuckDBPyConnection, run: RunRow, paths: list[str]) -> None:
    """Output files name their requests by request_key; the run's dataset version gives each its custom_id."""
    if not paths:
        return
    with parquet_files(con, "output_files", paths):
        replace_transient_errors(con, run.model_fingerprint, run.sampling_hash)
        con.execute(
            f"""
            INSERT INTO outputs BY NAME
            SELECT * FROM (
                SELECT {OUTPUT_ID_SQL.format(t="o")} AS output_id, o.* EXCLUDE (request_key),
                       o.request_key, $fp AS model_fingerprint, $sh AS sampling_hash, $run AS run_id,
                       $dv AS dataset_version, q.custom_id
                FROM output_files o
                JOIN requests q ON q.dataset_version = $dv AND q.request_key = o.request_key
                               AND q.duplicate_of IS NULL
                QUALIFY row_number() OVER (PARTITION BY output_id) = 1
            ) new
            ANTI JOIN outputs USING (output_id)  -- an answer stored before stays as it is
            """,
            {
                "dv": run.dataset_version,
                "fp": run.model_fingerprint,
                "sh": run.sampling_hash,
                "run": run.run_id,
            },
        )


def replace_transient_errors(con: duckdb.DuckDBPyConnection, fingerprint: str, sampling: str) -> None:
    """Remove the stored transient error rows (and their scores) that `output_files` (registered) answer anew."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE replaced AS
        SELECT output_id FROM outputs
        WHERE error_kind = 'transient' AND output_id IN (
            SELECT {OUTPUT_ID_SQL.format(t="o")} FROM output_files o)
        """,
        {"fp": fingerprint, "sh": sampling},
    )
    con.execute("DELETE FROM scores WHERE output_id IN (SELECT output_id FROM replaced)")
    con.execute("DELETE FROM outputs WHERE output_id IN (SELECT output_id FROM replaced)")
    con.execute("DROP TABLE replaced")


def insert_scores(con: duckdb.DuckDBPyConnection, run_id: str, fingerprint: str, sampling: str, paths: list[str]) -> None:
    """Score files name outputs by request_key and sample; the run's model and sampling complete the output_id."""
    if not paths:
        return
    with parquet_files(con, "score_files", paths):
        # a score file without directions (none of these files has the column) scores without a winner
        direction = "s.direction" if "direction" in con.table("score_files").columns else "NULL"
        con.execute(
            f"""
            INSERT INTO scores BY NAME
            SELECT * FROM (
                SELECT {OUTPUT_ID_SQL.format(t="s")} AS output_id, s.scorer, s.scorer_version,
                       s.value, s.label, $run AS run_id, coalesce({direction}, 'none') AS direction
                FROM score_files s
                QUALIFY row_number() OVER (PARTITION BY output_id, scorer, scorer_version) = 1
            ) new
            ANTI JOIN scores USING (output_id, scorer, scorer_version)  -- a score stored before stays as it is
            """,
            {"fp": fingerprint, "sh": sampling, "run": run_id},
        )


def commit_scores(con: duckdb.DuckDBPyConnection, run: dict, paths: list[str]) -> int:
    """Add score rows for a stored run (`run_keys`) in one transaction; rows already there stay. Returns the new rows."""
    before = fetch_value(con, "SELECT count(*) FROM scores")
    with transaction(con):
        insert_scores(con, run["run_id"], run["model_fingerprint"], run["sampling_hash"], paths)
    return fetch_value(con, "SELECT count(*) FROM scores") - before


def record_comparison(con: duckdb.DuckDBPyConnection, comparison_id: str, runs: dict[str, str]) -> None:
    """Which run is which variant of a comparison."""
    known = {
        row[0] for row in con.execute("SELECT run_id FROM runs WHERE list_contains(?, run_id)", [list(runs.values())]).fetchall()
    }
    if missing := sorted(set(runs.values()) - known):
        raise StoreError(f"comparison {comparison_id}: runs {', '.join(missing)} are not in this results file")
    with transaction(con):
        insert_rows(
            con, "comparisons", [ComparisonRow(comparison_id=comparison_id, variant=v, run_id=r) for v, r in runs.items()]
        )


def record_differences(con: duckdb.DuckDBPyConnection, rows: list[ComparisonDifferenceRow]) -> None:
    """A comparison's paired differences; recorded again (a re-run of the flow's task), they stay as they were."""
    with transaction(con):
        insert_rows(con, "comparison_differences", rows)


def record_judgement(
    con: duckdb.DuckDBPyConnection, judgement: JudgementRow, verdict_paths: list[str], score_paths: list[str]
) -> None:
    """A judgement and its verdict rows, in place of what the same judgement left before; and an absolute
    judge's grades as scores, in place of the same judge's earlier scores of those answers (one transaction)."""
    with transaction(con), parquet_files(con, "verdict_files", verdict_paths):
        con.execute("DELETE FROM judge_verdicts WHERE judgement_id = ?", [judgement.judgement_id])
        con.execute("DELETE FROM judgements WHERE judgement_id = ?", [judgement.judgement_id])
        insert_rows(con, "judgements", [judgement])
        con.execute("INSERT INTO judge_verdicts BY NAME SELECT * FROM verdict_files")
        if score_paths:
            replace_scores(con, score_paths)


def replace_scores(con: duckdb.DuckDBPyConnection, paths: list[str]) -> None:
    """Score rows that name their output (a judge's grades): the judge's latest word on an answer stands,
    so a grade that was missing (its request failed) is not kept over the one that came later."""
    with parquet_files(con, "graded_files", paths):
        con.execute(
            """
            DELETE FROM scores USING graded_files g
            WHERE scores.output_id = g.output_id AND scores.scorer = g.scorer AND scores.scorer_version = g.scorer_version
            """
        )
        con.execute(
            """
            INSERT INTO scores BY NAME
            SELECT * FROM graded_files QUALIFY row_number() OVER (PARTITION BY output_id, scorer, scorer_version) = 1
            """
        )
