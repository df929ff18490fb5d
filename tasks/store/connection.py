"""Opening the results file: for reading (read-only) or for writing (migrated), waiting while another
process holds it (DuckDB allows one writer process per file, and no reader beside it)."""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

import duckdb

from tasks.store.migrations import LATEST_VERSION, applied_versions, migrate
from tasks.store.sql import StoreError


def connect_waiting(path: str | Path, read_only: bool, lock_timeout_seconds: float) -> duckdb.DuckDBPyConnection:
    """Connect; while another process holds the file (DuckDB allows one writer process), wait and retry."""
    deadline = time.monotonic() + lock_timeout_seconds
    delay = 0.1
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as error:
            if "lock" not in str(error).lower() or time.monotonic() >= deadline:
                purpose = "reading" if read_only else "writing"
                hint = "" if read_only else " Nothing was committed; the shard files keep the results and a re-run commits them."
                raise StoreError(
                    f"DuckDB file {path} could not be opened for {purpose} within {lock_timeout_seconds:.0f}s: {error}.{hint}"
                ) from error
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def open_for_write(path: str | Path, lock_timeout_seconds: float = 60.0) -> duckdb.DuckDBPyConnection:
    """The file opened for writing, created if missing and migrated to the current schema."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = connect_waiting(path, read_only=False, lock_timeout_seconds=lock_timeout_seconds)
    try:
        migrate(con)
    except BaseException:
        con.close()
        raise
    return con


def open_for_read(path: str | Path, lock_timeout_seconds: float = 60.0) -> duckdb.DuckDBPyConnection:
    """The file opened read-only. A file of an older schema is upgraded in place first, so every
    named read sees the columns it expects."""
    if not Path(path).is_file():
        raise StoreError(f"results file {path} does not exist: run `vbf run` first")
    con = connect_waiting(path, read_only=True, lock_timeout_seconds=lock_timeout_seconds)
    if max(applied_versions(con), default=0) < LATEST_VERSION:
        con.close()
        open_for_write(path, lock_timeout_seconds).close()
        con = connect_waiting(path, read_only=True, lock_timeout_seconds=lock_timeout_seconds)
    return con


def writing(path: str | Path, lock_timeout_seconds: float = 60.0) -> closing[duckdb.DuckDBPyConnection]:
    """`with writing(path) as con:` the file open for writing, closed on leaving."""
    return closing(open_for_write(path, lock_timeout_seconds))


def reading(path: str | Path, lock_timeout_seconds: float = 60.0) -> closing[duckdb.DuckDBPyConnection]:
    """`with reading(path) as con:` the file open read-only, closed on leaving."""
    return closing(open_for_read(path, lock_timeout_seconds))
