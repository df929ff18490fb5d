"""The DuckDB results store: ordered, recorded migrations and one idempotent commit per run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
from prefect import task

from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, StoreConfig
from tasks.engine import sampling_hash
from tasks.infer import ShardOutput
from tasks.prepare import RequestSet
from tasks.report import RunSummary, code_version
from tasks.score import scorers_version

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


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ).fetchone()[0]
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply the pending migrations, each in its own transaction; refuse a file from a newer version."""
    current = schema_version(con)
    if current > LATEST_VERSION:
        raise StoreError(
            f"the results file has schema version {current}, newer than this code knows ({LATEST_VERSION}): "
            "upgrade vllm-batch-flows to use it"
        )
    for version, name, sql in MIGRATIONS:
        if version <= current:
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
                "messages, duplicate_of, source_file, source_row FROM read_parquet($files) ON CONFLICT DO NOTHING",
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
        if files.scores:
            con.execute(
                f"""
                INSERT INTO scores BY NAME
                SELECT {OUTPUT_ID_SQL.format(t="s", fp="fp", sh="sh")} AS output_id, s.scorer, s.scorer_version,
                       s.value, s.label, $run AS run_id
                FROM read_parquet($files, union_by_name = true) s
                ON CONFLICT DO NOTHING
                """,
                {"fp": keys["fp"], "sh": keys["sh"], "run": keys["run"], "files": files.scores},
            )
        for shard in shards:
            insert_row(con, "run_shards", {"run_id": keys["run"], **shard})
        insert_row(con, "runs", run)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


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
    template_hash: str,
    scorer_names: list[str],
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
        "template_hash": template_hash,
        "scorers": scorers_version(scorer_names),
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
    scorer_names: list[str],
    request_set: RequestSet,
    outputs: list[ShardOutput],
    cached: list[bool],
    score_files: list[str],
    started_at: datetime,
    store: StoreConfig,
) -> None:
    """The only writer of the DuckDB file: one transaction for the whole run."""
    run = run_row(summary, model, sampling, request_set.template_hash, scorer_names, started_at, datetime.now(timezone.utc))
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
