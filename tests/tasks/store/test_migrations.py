"""Migrations: recorded, run once, in version order, an older file upgraded in place, a newer one refused;
and schema.sql, the snapshot of what they build, kept equal to it."""

from pathlib import Path

import duckdb
import pytest

from tasks.store import migrations
from tasks.store.commit import commit_run
from tasks.store.connection import open_for_write
from tasks.store.migrations import LATEST_VERSION, MIGRATIONS, migrate, schema_sql
from tasks.store.sql import StoreError, insert_rows

TABLES = ["dataset_versions", "requests", "rejected_rows", "runs", "run_shards", "outputs", "scores"]
ALL_VERSIONS = [(migration.version,) for migration in MIGRATIONS]


def test_migrations_are_recorded_and_run_once(tmp_path):
    con = open_for_write(tmp_path / "r.duckdb")
    assert migrate(con) == LATEST_VERSION
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == ALL_VERSIONS
    names = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert set(TABLES) | {"schema_migrations", "run_outputs", "run_summary", "latest_outputs", "output_lineage"} <= names
    assert [m.version for m in MIGRATIONS] == sorted({m.version for m in MIGRATIONS})  # ordered, no number twice


def test_a_file_from_a_newer_version_is_refused(tmp_path):
    con = open_for_write(tmp_path / "r.duckdb")
    con.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
    with pytest.raises(StoreError, match="schema version 999, newer than this code knows"):
        migrate(con)


def test_schema_sql_is_what_the_migrations_build():
    with duckdb.connect() as con:
        migrate(con)
        built = schema_sql(con)
    snapshot = Path(migrations.__file__).parents[1] / "schema.sql"
    assert built == snapshot.read_text(), "regenerate it: python -m tasks.store.migrations > tasks/store/schema.sql"


def apply_first_migration_only(con) -> None:
    version, name, sql = MIGRATIONS[0]
    con.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
        "applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp)"
    )
    con.execute(sql)
    con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])


def rows_of(con, columns: dict[str, list[str]]) -> dict:
    return {t: sorted(map(repr, con.execute(f"SELECT {', '.join(cs)} FROM {t}").fetchall())) for t, cs in columns.items()}


def test_a_file_from_migration_1_is_upgraded_in_place_and_keeps_its_rows(tmp_path, commit_inputs):
    files = commit_inputs.files
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    apply_first_migration_only(con)
    insert_rows(con, "dataset_versions", [commit_inputs.dataset])
    con.execute(
        "INSERT INTO requests SELECT 'dv1', custom_id, request_key, prompt, messages, duplicate_of, source_file, "
        "source_row FROM read_parquet(?)",
        [files.requests[0]],
    )
    con.execute(
        "INSERT INTO outputs SELECT md5(request_key), request_key, 'fp', 'sh', sample_index, 'r1', 'dv1', "
        "CASE request_key WHEN 'k1' THEN 'a' ELSE 'b' END, shard_key, output_key, text, finish_reason, "
        "prompt_tokens, completion_tokens, error_code, error, current_timestamp FROM read_parquet(?)",
        [files.outputs[0]],
    )
    run = commit_inputs.run.model_dump(
        exclude={"stage_seconds", "reused_requests", "input_fingerprint", "fan_out", "transient_errors", "status", "rerun_of"}
    )
    con.execute(f"INSERT INTO runs ({', '.join(run)}) VALUES ({', '.join('?' for _ in run)})", list(run.values()))
    columns = {t: [c[0] for c in con.execute(f"DESCRIBE {t}").fetchall() if c[0] != "created_at"] for t in TABLES}
    before = rows_of(con, columns)
    con.close()

    con = open_for_write(path)  # migrates
    assert rows_of(con, columns) == before  # the old columns keep their rows; new columns are null
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == ALL_VERSIONS
    assert con.execute("SELECT count(*), count(reference) FROM requests").fetchone() == (3, 0)
    assert con.execute("SELECT custom_id, source_file, source_row, shard_key FROM output_lineage ORDER BY 1").fetchall() == [
        ("a", "f", 0, "s1"),
        ("b", "f", 1, "s1"),
    ]
    commit_run(con, commit_inputs)  # the upgraded file takes new commits
    assert con.execute("SELECT count(reference) FROM requests").fetchone() == (0,)  # existing rows are not rewritten


def test_migrations_numbered_in_parallel_all_apply(tmp_path, monkeypatch):
    """A file made by a branch that had migrations 1 and 3 still gets the 2 merged in later."""
    con = duckdb.connect(str(tmp_path / "r.duckdb"))
    monkeypatch.setattr(migrations, "MIGRATIONS", [m for m in MIGRATIONS if m.version in (1, 3)])
    migrations.migrate(con)
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(1,), (3,)]
    monkeypatch.undo()
    assert migrations.migrate(con) == LATEST_VERSION
    assert (2,) in con.execute("SELECT version FROM schema_migrations").fetchall()
    assert "mean_logprob" in {row[0] for row in con.execute("DESCRIBE outputs").fetchall()}
