"""The store's SQL helpers: the one transaction helper, rows as dicts, inserts of typed rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
from pydantic import BaseModel


class StoreError(RuntimeError):
    """The results file cannot be used: missing, held by another process too long, or from a newer version."""


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection, begin: str = "BEGIN") -> Iterator[duckdb.DuckDBPyConnection]:
    """All or nothing: a failure anywhere in the block rolls every statement of it back."""
    con.execute(begin)
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def fetch_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> list[dict]:
    # fetchall, not fetchone: DuckDB 2 refuses the next query while a result is still open
    cursor = con.execute(sql, params)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def fetch_value(con: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> object:
    return con.execute(sql, params).fetchall()[0][0]


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[BaseModel], keep_existing: bool = True) -> None:
    """Insert typed rows; with keep_existing, a row whose key is already there stays as it is (inserting twice
    changes nothing)."""
    if not rows:
        return
    columns = list(type(rows[0]).model_fields)
    conflict = " ON CONFLICT DO NOTHING" if keep_existing else ""
    con.executemany(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}){conflict}",
        [[getattr(row, column) for column in columns] for row in rows],
    )
