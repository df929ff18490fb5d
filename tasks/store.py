"""The DuckDB results store: ordered, recorded migrations and one idempotent commit per run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
from prefect import task

from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, StoreConfig
from tasks.engine import sampling_hash
from tasks.infer import ShardOutput
from tasks.prepare import RequestSet
from tasks.report import RunSummary, code_version
from tasks.score import ScorerSpec, resolve_scorers, scorers_version

# Ordered and append-only: a released migration is never edited, a change is a new entry.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE dataset_versions (
            dataset_version VARCHAR PRIMARY KEY,
            dataset_name    VARCHAR NOT NULL,
            source          VARCHAR NOT NULL,
            spec            JSON NOT NULL,
            template_hash   VARCHAR NOT NULL,
            rows_read       BIGINT NOT NULL,
            requests        BIGINT NOT NULL,
            unique_requests BIGINT NOT NULL,
            rejected        BIGINT NOT NULL,
            created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE requests (
            dataset_version VARCHAR NOT NULL,
            custom_id       VARCHAR NOT NULL,
            request_key     VARCHAR NOT NULL,
            prompt          VARCHAR,
            messages        JSON,
            duplicate_of    VARCHAR,
            source_file     VARCHAR NOT NULL,
            source_row      BIGINT NOT NULL,
            PRIMARY KEY (dataset_version, custom_id)
        );
        CREATE TABLE rejected_rows (
            dataset_version VARCHAR NOT NULL,
            source_file     VARCHAR NOT NULL,
            source_row      BIGINT NOT NULL,
            custom_id       VARCHAR,
            field           VARCHAR NOT NULL,
            reason          VARCHAR NOT NULL,
            PRIMARY KEY (dataset_version, source_file, source_row)
        );
        CREATE TABLE runs (
            run_id            VARCHAR PRIMARY KEY,
            dataset_version   VARCHAR NOT NULL,
            dataset_name      VARCHAR NOT NULL,
            model             VARCHAR NOT NULL,
            model_fingerprint VARCHAR NOT NULL,
            engine            VARCHAR NOT NULL,
            engine_args       JSON NOT NULL,
            sampling_params   JSON NOT NULL,
            sampling_hash     VARCHAR NOT NULL,
            template_hash     VARCHAR NOT NULL,
            scorers           VARCHAR NOT NULL,
            code_version      VARCHAR NOT NULL,
            started_at        TIMESTAMPTZ NOT NULL,
            finished_at       TIMESTAMPTZ NOT NULL,
            wall_seconds      DOUBLE NOT NULL,
            rows_read         BIGINT NOT NULL,
            rejected          BIGINT NOT NULL,
            requests          BIGINT NOT NULL,
            unique_requests   BIGINT NOT NULL,
            duplicates        BIGINT NOT NULL,
            shards            INTEGER NOT NULL,
            cached_shards     INTEGER NOT NULL,
            engine_requests   BIGINT NOT NULL,
            outputs           BIGINT NOT NULL,
            errors            BIGINT NOT NULL,
            prompt_tokens     BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            generated_tokens  BIGINT NOT NULL,
            tokens_per_second DOUBLE NOT NULL
        );
        CREATE TABLE run_shards (
            run_id            VARCHAR NOT NULL,
            shard_key         VARCHAR NOT NULL,
            output_key        VARCHAR NOT NULL,
            requests          INTEGER NOT NULL,
            errors            INTEGER NOT NULL,
            prompt_tokens     BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            generate_seconds  DOUBLE NOT NULL,
            cached            BOOLEAN NOT NULL,
            PRIMARY KEY (run_id, shard_key)
        );
        CREATE TABLE outputs (
            output_id         VARCHAR PRIMARY KEY,
            request_key       VARCHAR NOT NULL,
            model_fingerprint VARCHAR NOT NULL,
            sampling_hash     VARCHAR NOT NULL,
            sample_index      INTEGER NOT NULL,
            run_id            VARCHAR NOT NULL,
            dataset_version   VARCHAR NOT NULL,
            custom_id         VARCHAR NOT NULL,
            shard_key         VARCHAR NOT NULL,
            output_key        VARCHAR NOT NULL,
            text              VARCHAR,
            finish_reason     VARCHAR,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            error_code        VARCHAR,
            error             VARCHAR,
            created_at        TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE scores (
            output_id      VARCHAR NOT NULL,
            scorer         VARCHAR NOT NULL,
            scorer_version VARCHAR NOT NULL,
            value          DOUBLE,
            label          VARCHAR,
            run_id         VARCHAR NOT NULL,
            created_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (output_id, scorer, scorer_version)
        );
        CREATE VIEW run_outputs AS
            SELECT r.run_id, q.custom_id, q.duplicate_of, o.sample_index, o.text, o.finish_reason,
                   o.prompt_tokens, o.completion_tokens, o.error_code, o.error, o.output_id,
                   o.run_id AS produced_by_run_id, q.request_key, q.dataset_version
            FROM runs r
            JOIN requests q ON q.dataset_version = r.dataset_version
            JOIN outputs o ON o.request_key = q.request_key
                          AND o.model_fingerprint = r.model_fingerprint
                          AND o.sampling_hash = r.sampling_hash;
        CREATE VIEW run_summary AS
            SELECT run_id, dataset_name, dataset_version, model, started_at, wall_seconds,
                   requests, unique_requests, duplicates, rejected, shards, cached_shards,
                   engine_requests, outputs, errors,
                   CASE WHEN outputs > 0 THEN errors / outputs END AS error_rate,
                   prompt_tokens, completion_tokens, tokens_per_second
            FROM runs;
        """,
    ),
    (
        3,
        "scoring, lineage and comparison",
        """
        ALTER TABLE requests ADD COLUMN reference VARCHAR;
        CREATE TABLE comparisons (
            comparison_id VARCHAR NOT NULL,
            variant       VARCHAR NOT NULL,
            run_id        VARCHAR NOT NULL,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (comparison_id, variant)
        );
        -- Where one answer came from: its run, shard, dataset version and source file and row.
        CREATE VIEW output_lineage AS
            SELECT o.output_id, o.custom_id, o.run_id, o.dataset_version, d.dataset_name, d.source AS dataset_source,
                   q.source_file, q.source_row, q.request_key, o.shard_key, o.output_key, o.sample_index,
                   r.model, r.model_fingerprint, r.sampling_hash, r.template_hash, r.code_version, o.created_at
            FROM outputs o
            JOIN requests q ON q.dataset_version = o.dataset_version AND q.custom_id = o.custom_id
            JOIN dataset_versions d ON d.dataset_version = o.dataset_version
            JOIN runs r ON r.run_id = o.run_id;
        -- Per run and scorer: the mean over the run's unique outputs with a 95% normal-approximation CI.
        CREATE VIEW run_scores AS
            SELECT ro.run_id, s.scorer, s.scorer_version,
                   count(s.value) AS n,
                   count(*) - count(s.value) AS unscored,
                   avg(s.value) AS mean,
                   stddev_samp(s.value) AS stddev,
                   avg(s.value) - 1.96 * stddev_samp(s.value) / sqrt(count(s.value)) AS ci95_low,
                   avg(s.value) + 1.96 * stddev_samp(s.value) / sqrt(count(s.value)) AS ci95_high
            FROM run_outputs ro
            JOIN scores s ON s.output_id = ro.output_id
            WHERE ro.duplicate_of IS NULL
            GROUP BY ro.run_id, s.scorer, s.scorer_version;
        CREATE OR REPLACE VIEW run_summary AS
            SELECT r.run_id, r.dataset_name, r.dataset_version, r.model, r.model_fingerprint, r.engine,
                   r.sampling_hash, r.template_hash, r.code_version, r.started_at, r.wall_seconds,
                   r.requests, r.unique_requests, r.duplicates, r.rejected, r.shards, r.cached_shards,
                   r.engine_requests, r.outputs, r.errors,
                   CASE WHEN r.outputs > 0 THEN r.errors / r.outputs END AS error_rate,
                   r.prompt_tokens, r.completion_tokens, r.generated_tokens, r.tokens_per_second,
                   (SELECT map_from_entries(list((s.scorer || '@' || s.scorer_version, s.mean) ORDER BY s.scorer))
                    FROM run_scores s WHERE s.run_id = r.run_id) AS mean_scores
            FROM runs r;
        -- The newest answer per input row and model: what "the current result" means.
        CREATE VIEW latest_outputs AS
            SELECT r.dataset_name, ro.custom_id, r.model, ro.sample_index, ro.run_id, r.started_at,
                   ro.dataset_version, ro.duplicate_of, ro.text, ro.finish_reason, ro.prompt_tokens,
                   ro.completion_tokens, ro.error_code, ro.error, ro.output_id, ro.produced_by_run_id,
                   ro.request_key
            FROM run_outputs ro
            JOIN runs r ON r.run_id = ro.run_id
            QUALIFY row_number() OVER (
                PARTITION BY r.dataset_name, ro.custom_id, r.model, ro.sample_index
                ORDER BY r.started_at DESC, r.run_id DESC
            ) = 1;
        -- Two runs of the same dataset version, scorer by scorer, over the requests both answered.
        CREATE MACRO compare_runs(run_a, run_b) AS TABLE
            WITH checked AS (
                SELECT CASE WHEN a.dataset_version = b.dataset_version THEN a.dataset_version
                            ELSE error('compare_runs: runs ' || a.run_id || ' and ' || b.run_id
                                       || ' are on different dataset versions') END AS dataset_version
                FROM runs a, runs b WHERE a.run_id = run_a AND b.run_id = run_b
            ),
            scored AS (
                SELECT ro.run_id, ro.custom_id, ro.sample_index, s.scorer, s.scorer_version, s.value
                FROM run_outputs ro JOIN scores s ON s.output_id = ro.output_id
                WHERE ro.run_id IN (run_a, run_b) AND ro.duplicate_of IS NULL
                  AND ro.dataset_version = (SELECT dataset_version FROM checked)
            )
            SELECT a.scorer, a.scorer_version, count(*) AS pairs,
                   avg(a.value) AS mean_a, avg(b.value) AS mean_b, avg(b.value - a.value) AS mean_diff,
                   avg(b.value - a.value) - 1.96 * stddev_samp(b.value - a.value) / sqrt(count(*)) AS diff_ci95_low,
                   avg(b.value - a.value) + 1.96 * stddev_samp(b.value - a.value) / sqrt(count(*)) AS diff_ci95_high,
                   count(*) FILTER (WHERE b.value > a.value) AS b_higher,
                   count(*) FILTER (WHERE b.value < a.value) AS a_higher,
                   count(*) FILTER (WHERE b.value = a.value) AS equal
            FROM scored a
            JOIN scored b ON b.custom_id = a.custom_id AND b.sample_index = a.sample_index
                         AND b.scorer = a.scorer AND b.scorer_version = a.scorer_version
            WHERE a.run_id = run_a AND b.run_id = run_b AND a.value IS NOT NULL AND b.value IS NOT NULL
            GROUP BY a.scorer, a.scorer_version
            ORDER BY a.scorer, a.scorer_version;
        CREATE VIEW comparison_scores AS
            SELECT c.comparison_id, c.variant, c.run_id, s.scorer, s.scorer_version, s.n, s.unscored, s.mean,
                   s.stddev, s.ci95_low, s.ci95_high
            FROM comparisons c JOIN run_scores s ON s.run_id = c.run_id;
        -- Pairwise win rates per scorer (a higher value wins; ties count half; unscored answers are left out).
        CREATE VIEW comparison_win_rates AS
            WITH scored AS (
                SELECT c.comparison_id, c.variant, ro.custom_id, ro.sample_index, s.scorer, s.scorer_version, s.value
                FROM comparisons c
                JOIN run_outputs ro ON ro.run_id = c.run_id AND ro.duplicate_of IS NULL
                JOIN scores s ON s.output_id = ro.output_id
                WHERE s.value IS NOT NULL
            )
            SELECT a.comparison_id, a.variant AS variant_a, b.variant AS variant_b, a.scorer, a.scorer_version,
                   count(*) AS pairs,
                   count(*) FILTER (WHERE a.value > b.value) AS wins,
                   count(*) FILTER (WHERE a.value < b.value) AS losses,
                   count(*) FILTER (WHERE a.value = b.value) AS ties,
                   (count(*) FILTER (WHERE a.value > b.value) + 0.5 * count(*) FILTER (WHERE a.value = b.value))
                       / count(*) AS win_rate
            FROM scored a
            JOIN scored b ON b.comparison_id = a.comparison_id AND b.variant <> a.variant
                         AND b.custom_id = a.custom_id AND b.sample_index = a.sample_index
                         AND b.scorer = a.scorer AND b.scorer_version = a.scorer_version
            GROUP BY a.comparison_id, a.variant, b.variant, a.scorer, a.scorer_version;
        """,
    ),
]
MIGRATIONS.append(
    (
        2,
        "inference details: logprobs, latency, batch sizes, stage timings",
        """
        ALTER TABLE outputs ADD COLUMN mean_logprob DOUBLE;
        ALTER TABLE outputs ADD COLUMN latency_seconds DOUBLE;
        ALTER TABLE run_shards ADD COLUMN batch_size INTEGER;
        ALTER TABLE run_shards ADD COLUMN max_num_seqs INTEGER;
        ALTER TABLE run_shards ADD COLUMN engine_load_seconds DOUBLE;
        ALTER TABLE runs ADD COLUMN stage_seconds JSON;
        """,
    )
)
MIGRATIONS.append(
    (
        4,
        "per-request overrides; duplicates answered through duplicate_of",
        """
        ALTER TABLE requests ADD COLUMN overrides JSON;
        ALTER TABLE runs ADD COLUMN reused_requests BIGINT NOT NULL DEFAULT 0;
        DROP VIEW run_outputs;
        -- A duplicate (exact after normalization, or near) gets its canonical request's answer:
        -- follow duplicate_of, since its own request_key may differ from the canonical's.
        CREATE VIEW run_outputs AS
            SELECT r.run_id, q.custom_id, q.duplicate_of, o.sample_index, o.text, o.finish_reason,
                   o.prompt_tokens, o.completion_tokens, o.error_code, o.error, o.output_id,
                   o.run_id AS produced_by_run_id, q.request_key, q.dataset_version, o.mean_logprob, o.latency_seconds
            FROM runs r
            JOIN requests q ON q.dataset_version = r.dataset_version
            LEFT JOIN requests c ON c.dataset_version = q.dataset_version AND c.custom_id = q.duplicate_of
            JOIN outputs o ON o.request_key = coalesce(c.request_key, q.request_key)
                          AND o.model_fingerprint = r.model_fingerprint
                          AND o.sampling_hash = r.sampling_hash;
        """,
    )
)
MIGRATIONS.append(
    (
        5,
        "label studio curation",
        """
        CREATE TABLE label_tasks (
            server_url    VARCHAR NOT NULL,
            project_id    BIGINT NOT NULL,
            project_title VARCHAR NOT NULL,
            run_id        VARCHAR NOT NULL,
            custom_id     VARCHAR NOT NULL,
            output_id     VARCHAR NOT NULL,
            task_id       BIGINT NOT NULL,
            strategy      VARCHAR NOT NULL,
            pushed_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (server_url, project_id, run_id, custom_id)
        );
        CREATE TABLE annotations (
            server_url     VARCHAR NOT NULL,
            annotation_id  BIGINT NOT NULL,
            task_id        BIGINT NOT NULL,
            project_id     BIGINT,
            run_id         VARCHAR NOT NULL,
            custom_id      VARCHAR NOT NULL,
            output_id      VARCHAR,
            annotator      VARCHAR,
            verdict        VARCHAR,
            rating         INTEGER,
            corrected_text VARCHAR,
            cancelled      BOOLEAN NOT NULL,
            created_at     TIMESTAMPTZ,
            updated_at     TIMESTAMPTZ,
            pulled_at      TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (server_url, annotation_id)
        );
        CREATE TABLE curated_versions (
            curated_version VARCHAR PRIMARY KEY,
            name            VARCHAR NOT NULL,
            content_hash    VARCHAR NOT NULL,
            source_runs     JSON NOT NULL,
            examples        BIGINT NOT NULL,
            accepted        BIGINT NOT NULL,
            corrected       BIGINT NOT NULL,
            path            VARCHAR NOT NULL,
            created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        );
        """,
    )
)
# Numbers are handed out per issue and merged in any order: the latest is the largest.
MIGRATIONS.append(
    (
        6,
        "runs record the input as prepared (an unchanged re-run is known before it starts) and whether duplicates fan out",
        """
        ALTER TABLE runs ADD COLUMN input_fingerprint VARCHAR;
        ALTER TABLE runs ADD COLUMN fan_out BOOLEAN NOT NULL DEFAULT true;
        DROP VIEW run_outputs;
        -- A duplicate (exact after normalization, or near) gets its canonical request's answer:
        -- follow duplicate_of, since its own request_key may differ from the canonical's. A run
        -- with fan_out off answers its canonical requests only.
        CREATE VIEW run_outputs AS
            SELECT r.run_id, q.custom_id, q.duplicate_of, o.sample_index, o.text, o.finish_reason,
                   o.prompt_tokens, o.completion_tokens, o.error_code, o.error, o.output_id,
                   o.run_id AS produced_by_run_id, q.request_key, q.dataset_version, o.mean_logprob, o.latency_seconds
            FROM runs r
            JOIN requests q ON q.dataset_version = r.dataset_version
            LEFT JOIN requests c ON c.dataset_version = q.dataset_version AND c.custom_id = q.duplicate_of
            JOIN outputs o ON o.request_key = coalesce(c.request_key, q.request_key)
                          AND o.model_fingerprint = r.model_fingerprint
                          AND o.sampling_hash = r.sampling_hash
            WHERE r.fan_out OR q.duplicate_of IS NULL;
        """,
    )
)
LATEST_VERSION = max(version for version, _, _ in MIGRATIONS)


class StoreError(RuntimeError):
    pass


def connect(path: str | Path, lock_timeout_seconds: float = 60.0) -> duckdb.DuckDBPyConnection:
    """Open the file for writing; while another process holds it, wait and retry up to the timeout."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_timeout_seconds
    delay = 0.1
    while True:
        try:
            return duckdb.connect(str(path))
        except duckdb.IOException as error:
            if "lock" not in str(error).lower() or time.monotonic() >= deadline:
                raise StoreError(
                    f"DuckDB file {path} could not be opened for writing within {lock_timeout_seconds:.0f}s: {error}. "
                    "Nothing was committed; the shard files keep the results and a re-run commits them."
                ) from error
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def applied_versions(con: duckdb.DuckDBPyConnection) -> set[int]:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ).fetchone()[0]
    if not exists:
        return set()
    return {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    return max(applied_versions(con), default=0)


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply the pending migrations, each in its own transaction; refuse a file from a newer version."""
    applied = applied_versions(con)
    current = max(applied, default=0)
    if current > LATEST_VERSION:
        raise StoreError(
            f"the results file has schema version {current}, newer than this code knows ({LATEST_VERSION}): "
            "upgrade vllm-batch-flows to use it"
        )
    # By recorded version, not by the highest one: migrations numbered in parallel branches
    # (1, 3, then a merged 2) still all apply to a file created in between.
    for version, name, sql in sorted(MIGRATIONS):
        if version in applied:
            continue
        con.execute("BEGIN")
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp)"
        )
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
        con.execute("COMMIT")
    return LATEST_VERSION


@dataclass(frozen=True)
class CommitFiles:
    requests: list[str]
    rejected: list[str]
    outputs: list[str]
    scores: list[str]


# output_id identifies one answer by content: which request, which model, which sampling, which sample.
OUTPUT_ID_SQL = "md5(concat_ws(':', {t}.request_key, ${fp}, ${sh}, CAST({t}.sample_index AS VARCHAR)))"


def commit_run(con: duckdb.DuckDBPyConnection, run: dict, dataset: dict, shards: list[dict], files: CommitFiles) -> None:
    """Write a run and everything it produced in one transaction.

    Every insert ignores rows that are already there, so committing the same shard (or the same
    run) twice changes nothing, and a failure anywhere rolls the whole run back.
    """
    keys = {"dv": run["dataset_version"], "fp": run["model_fingerprint"], "sh": run["sampling_hash"], "run": run["run_id"]}
    con.execute("BEGIN")
    try:
        insert_row(con, "dataset_versions", dataset)
        if files.requests:
            con.execute(
                "INSERT INTO requests BY NAME SELECT $dv AS dataset_version, custom_id, request_key, prompt, "
                "messages, duplicate_of, source_file, source_row, overrides, reference "
                "FROM read_parquet($files) ON CONFLICT DO NOTHING",
                {"dv": keys["dv"], "files": files.requests},
            )
        if files.rejected:
            con.execute(
                "INSERT INTO rejected_rows BY NAME SELECT $dv AS dataset_version, source_file, source_row, "
                "custom_id, field, reason FROM read_parquet($files) ON CONFLICT DO NOTHING",
                {"dv": keys["dv"], "files": files.rejected},
            )
        if files.outputs:
            con.execute(
                f"""
                INSERT INTO outputs BY NAME
                SELECT {OUTPUT_ID_SQL.format(t="o", fp="fp", sh="sh")} AS output_id, o.* EXCLUDE (request_key),
                       o.request_key, $fp AS model_fingerprint, $sh AS sampling_hash, $run AS run_id,
                       $dv AS dataset_version, q.custom_id
                FROM read_parquet($files, union_by_name = true) o
                JOIN requests q ON q.dataset_version = $dv AND q.request_key = o.request_key
                               AND q.duplicate_of IS NULL
                ON CONFLICT DO NOTHING
                """,
                {**keys, "files": files.outputs},
            )
        insert_scores(con, keys["run"], keys["fp"], keys["sh"], files.scores)
        for shard in shards:
            insert_row(con, "run_shards", {"run_id": keys["run"], **shard})
        insert_row(con, "runs", run)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def insert_scores(con: duckdb.DuckDBPyConnection, run_id: str, fingerprint: str, sampling: str, paths: list[str]) -> None:
    """Score files name outputs by request_key and sample; the run's model and sampling complete the output_id."""
    if paths:
        con.execute(
            f"""
            INSERT INTO scores BY NAME
            SELECT {OUTPUT_ID_SQL.format(t="s", fp="fp", sh="sh")} AS output_id, s.scorer, s.scorer_version,
                   s.value, s.label, $run AS run_id
            FROM read_parquet($files, union_by_name = true) s
            ON CONFLICT DO NOTHING
            """,
            {"fp": fingerprint, "sh": sampling, "run": run_id, "files": paths},
        )


def insert_row(con: duckdb.DuckDBPyConnection, table: str, row: dict) -> None:
    columns = ", ".join(row)
    placeholders = ", ".join("?" for _ in row)
    con.execute(
        f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING", list(row.values())
    )



def dataset_row(dataset: DatasetSpec, request_set: RequestSet) -> dict:
    return {
        "dataset_version": request_set.dataset_version,
        "dataset_name": dataset.name,
        "source": dataset.source,
        "spec": dataset.model_dump_json(),
        "template_hash": request_set.template_hash,
        "rows_read": request_set.rows_read,
        "requests": request_set.requests,
        "unique_requests": request_set.unique_requests,
        "rejected": request_set.rejected,
    }


def run_row(
    summary: RunSummary,
    model: ModelConfig,
    sampling: SamplingConfig,
    request_set: RequestSet,
    fan_out: bool,
    scorers: list[str | ScorerSpec],
    started_at: datetime,
    finished_at: datetime,
) -> dict:
    counts = summary.model_dump(exclude={"model", "engine", "dataset_name", "duckdb_path", "stage_seconds"})
    return {
        **counts,
        "dataset_name": summary.dataset_name,
        "model": model.model,
        "engine": model.engine,
        "engine_args": model.model_dump_json(),
        "stage_seconds": json.dumps(summary.stage_seconds),
        "sampling_params": sampling.model_dump_json(),
        "sampling_hash": sampling_hash(sampling),
        "template_hash": request_set.template_hash,
        "input_fingerprint": request_set.input_fingerprint,
        "fan_out": fan_out,
        "scorers": scorers_version(resolve_scorers(scorers)),
        "code_version": code_version(),
        "started_at": started_at,
        "finished_at": finished_at,
    }


def shard_rows(outputs: list[ShardOutput], cached: list[bool]) -> list[dict]:
    return [
        {
            **output.model_dump(exclude={"path", "outputs"}),
            "cached": was_cached,
        }
        for output, was_cached in zip(outputs, cached)
    ]


@task(name="commit-results")
def commit_results(
    summary: RunSummary,
    dataset: DatasetSpec,
    model: ModelConfig,
    sampling: SamplingConfig,
    scorers: list[str | ScorerSpec],
    request_set: RequestSet,
    outputs: list[ShardOutput],
    cached: list[bool],
    score_files: list[str],
    started_at: datetime,
    store: StoreConfig,
) -> None:
    """The only writer of the DuckDB file: one transaction for the whole run."""
    run = run_row(summary, model, sampling, request_set, dataset.dedupe.fan_out, scorers, started_at, datetime.now(timezone.utc))
    commit_files = CommitFiles(
        requests=request_set.request_files,
        rejected=request_set.rejected_files,
        outputs=[output.path for output in outputs],
        scores=score_files,
    )
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    try:
        migrate(con)
        commit_run(con, run, dataset_row(dataset, request_set), shard_rows(outputs, cached), commit_files)
    finally:
        con.close()


def read_run_outputs(con: duckdb.DuckDBPyConnection, run_id: str) -> tuple[dict, pa.Table]:
    """A run and its unique outputs with what their requests asked: the input of scoring, without inference."""
    # fetchall, not fetchone: DuckDB 2 refuses the next query while a result is still open
    found = con.execute("SELECT run_id, model_fingerprint, sampling_hash FROM runs WHERE run_id = ?", [run_id]).fetchall()
    if not found:
        raise StoreError(f"run {run_id}: not in this results file")
    run = found[0]
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
    return {"run_id": run[0], "model_fingerprint": run[1], "sampling_hash": run[2]}, table


def commit_scores(con: duckdb.DuckDBPyConnection, run: dict, paths: list[str]) -> int:
    """Add score rows for a run's outputs in one transaction; rows already there are left as they are."""
    before = con.execute("SELECT count(*) FROM scores").fetchone()[0]
    con.execute("BEGIN")
    try:
        insert_scores(con, run["run_id"], run["model_fingerprint"], run["sampling_hash"], paths)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return con.execute("SELECT count(*) FROM scores").fetchone()[0] - before
