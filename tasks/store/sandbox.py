"""Users' conditions — the `where` of a curation selection or of an export — run here, and only here.

A condition is pasted into SQL, so it could say anything SQL says: read a file the worker can read,
list folders, write with COPY, ATTACH another database. So it never runs on the results file.
The fixed selection is first copied out of the results file into a temporary Parquet file (no
user text in that query); the condition then runs in a DuckDB of its own, in memory, that sees
only those candidate rows: external access is off (no file, folder, URL, ATTACH, COPY, INSTALL or
LOAD), the configuration is locked (no SET turns it back on), Python variables are not scanned,
and a timer interrupts it after its time limit.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterator

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.config import SpecError

SANDBOX_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "python_enable_replacements": False,
    "lock_configuration": True,  # last: the settings above can no longer be changed
}


class ConditionError(SpecError):
    """A user's condition that cannot run: a mistake in it, something it may not do, or too slow."""


@contextlib.contextmanager
def staged(con: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> Iterator[str]:
    """The rows of a fixed query as a temporary local Parquet file (removed on leaving).

    Copying them out is all the results file is needed for: readers let go of it before any
    user condition runs, so a commit waits only for the copy.
    """
    with tempfile.TemporaryDirectory(prefix="vbf-candidates-") as folder:
        path = f"{folder}/candidates.parquet"
        con.sql(sql, params=params).write_parquet(path)
        yield path


def one_query(sql: str, what: str) -> str:
    """The query, if it is one SELECT: a condition that closes the parenthesis to add a statement is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise ConditionError(f"{what} does not work: {error}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ConditionError(f"{what} is not a condition: it may not end the query or add statements")
    return sql


@contextlib.contextmanager
def sandbox(candidates_path: str, what: str, timeout_seconds: float) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB whose only table, `candidates`, is the staged Parquet file; interrupted after the time limit."""
    con = duckdb.connect(":memory:", config=SANDBOX_CONFIG)
    timer = threading.Timer(timeout_seconds, con.interrupt)
    try:
        con.register("candidates", ds.dataset(candidates_path))  # read through Arrow: DuckDB itself opens no file
        timer.start()
        yield con
    except duckdb.InterruptException:
        raise ConditionError(f"{what} took longer than {timeout_seconds:g}s and was stopped") from None
    except duckdb.PermissionException as error:
        raise ConditionError(
            f"{what} may use only the candidate columns (no files, folders, ATTACH, COPY, INSTALL/LOAD or SET): {error}"
        ) from None
    except duckdb.Error as error:
        raise ConditionError(f"{what} does not work: {error}") from None
    finally:
        timer.cancel()
        con.close()


def select_where(candidates_path: str, sql: str, params: dict, what: str, timeout_seconds: float) -> list[dict]:
    """The rows a query over `candidates` (holding a user's condition) returns, as dicts."""
    with sandbox(candidates_path, what, timeout_seconds) as con:
        return con.sql(one_query(sql, what), params=params).to_arrow_table().to_pylist()


def write_where(candidates_path: str, sql: str, what: str, timeout_seconds: float, path: str) -> int:
    """What a query over `candidates` (holding a user's condition) returns, as a local Parquet file; returns its rows."""
    rows = 0
    with sandbox(candidates_path, what, timeout_seconds) as con:
        reader = con.sql(one_query(sql, what)).to_arrow_reader(batch_size=10_000)
        with pq.ParquetWriter(path, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
    return rows
