"""The schema of the results file: ordered, named migrations (the SQL files here), each applied once and recorded.

Append-only: a released migration is never edited; a change is a new file. `../schema.sql` is a
snapshot of what they build (a test keeps it equal; regenerate it with
`python -m tasks.store.migrations > tasks/store/schema.sql`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import duckdb

from tasks.store.sql import StoreError, transaction


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def read_migrations(folder: Path = Path(__file__).parent) -> list[Migration]:
    """`NNNN_slug.sql` files, in order: the number is the version, the first line (a comment) the name."""
    migrations = []
    for path in sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        name, sql = path.read_text().split("\n", 1)
        migrations.append(Migration(int(path.name[:4]), name.removeprefix("--").strip(), sql))
    return migrations


# Numbers were handed out per issue and merged in any order; each file records the ones it has.
MIGRATIONS = read_migrations()
LATEST_VERSION = max(migration.version for migration in MIGRATIONS)


def applied_versions(con: duckdb.DuckDBPyConnection) -> set[int]:
    tables = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'")
    if not tables.fetchall()[0][0]:
        return set()
    return {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}


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
    for migration in MIGRATIONS:
        if migration.version in applied:
            continue
        with transaction(con):
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp)"
            )
            con.execute(migration.sql)
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [migration.version, migration.name])
    return LATEST_VERSION


def schema_sql(con: duckdb.DuckDBPyConnection) -> str:
    """The schema as DuckDB reports it: every table, view and macro, one statement each, by name."""
    statements = con.execute(
        """
        SELECT sql FROM (
            SELECT table_name AS name, sql FROM duckdb_tables() WHERE schema_name = 'main'
            UNION ALL
            SELECT view_name, sql FROM duckdb_views() WHERE schema_name = 'main' AND NOT internal
            UNION ALL
            SELECT function_name, 'CREATE MACRO ' || function_name || '(' || array_to_string(parameters, ', ')
                   || ') AS TABLE ' || macro_definition || ';'
            FROM duckdb_functions() WHERE schema_name = 'main' AND function_type = 'table_macro' AND NOT internal
        ) ORDER BY name
        """
    ).fetchall()
    return "\n\n".join(one_column_per_line(statement.strip()) for (statement,) in statements) + "\n"


def one_column_per_line(statement: str) -> str:
    """CREATE TABLE statements with a line per column, so a snapshot diff shows the column that changed."""
    if not statement.startswith("CREATE TABLE"):
        return statement
    head, body = statement.split("(", 1)
    parts, depth, start = [], 0, 0
    for position, char in enumerate(body):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[start:position].strip())
            start = position + 1
    parts.append(body[start:].strip().removesuffix(");").strip())
    return head.strip() + " (\n    " + ",\n    ".join(parts) + "\n);"
