"""The Batch API's own records — keys, files, batches, the audit trail — in a SQLite file of the service.

Not in the results file: DuckDB lets one process write a file, and while the server answers polls a
batch's run commits to the results file and `vbf keys` may add a key. SQLite in WAL mode lets them
all read and write at once; each write here is one short transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from tasks.store.sql import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL, revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, object TEXT NOT NULL, path TEXT NOT NULL, lines INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, status TEXT NOT NULL,
    priority INTEGER NOT NULL, object TEXT NOT NULL, run TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    at REAL NOT NULL, key_id TEXT NOT NULL, action TEXT NOT NULL, object_id TEXT NOT NULL
);
"""


_created: set[str] = set()  # files this process has already created the tables in


@contextmanager
def service_db(path: str | Path, write: bool = True) -> Iterator[sqlite3.Connection]:
    """The service's records, one transaction: committed on leaving, rolled back on an error.
    write=False: a reader, which in WAL mode never waits for a writer (a status poll)."""
    path = str(path)
    if path not in _created:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as con:
            con.execute("PRAGMA journal_mode=WAL")  # kept by the file: readers and a writer at once
            con.executescript(SCHEMA)
        _created.add(path)
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as con:
        con.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a crash of the process; fsync at checkpoints
        with transaction(con, "BEGIN IMMEDIATE" if write else "BEGIN"):  # IMMEDIATE: the write lock now, not at the first write
            yield con


# ---------------------------------------------------------------- keys


def add_key(con: sqlite3.Connection, key_id: str, name: str, key_hash: str) -> None:
    con.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL)", [key_id, name, key_hash, int(time.time())])


def replace_key(con: sqlite3.Connection, key_id: str, name: str, key_hash: str) -> None:
    """Add a key, or give an existing id its new hash (a Secret block's value that was rotated)."""
    con.execute("DELETE FROM api_keys WHERE key_id = ?", [key_id])
    add_key(con, key_id, name, key_hash)


def list_keys(con: sqlite3.Connection) -> list[dict]:
    cursor = con.execute("SELECT key_id, name, created_at, revoked_at FROM api_keys ORDER BY created_at, key_id")
    return [dict(zip(("key_id", "name", "created_at", "revoked_at"), row)) for row in cursor]


def revoke_key(con: sqlite3.Connection, key_id: str) -> bool:
    cursor = con.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", [int(time.time()), key_id])
    return cursor.rowcount == 1


def any_active_key(con: sqlite3.Connection) -> bool:
    return con.execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1").fetchone() is not None


def key_of_hash(con: sqlite3.Connection, key_hash: str) -> str | None:
    row = con.execute("SELECT key_id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", [key_hash]).fetchone()
    return row[0] if row else None


def record_audit(con: sqlite3.Connection, key_id: str, action: str, object_id: str, at: float | None = None) -> None:
    con.execute("INSERT INTO audit VALUES (?, ?, ?, ?)", [at or time.time(), key_id, action, object_id])


def audit_trail(con: sqlite3.Connection, limit: int) -> list[dict]:
    cursor = con.execute("SELECT at, key_id, action, object_id FROM audit ORDER BY at DESC LIMIT ?", [limit])
    return [dict(zip(("at", "key_id", "action", "object_id"), row)) for row in cursor]


# ---------------------------------------------------------------- files


def add_file(con: sqlite3.Connection, owner: str, file: dict, path: str, lines: int) -> None:
    con.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", [file["id"], owner, json.dumps(file), path, lines])


def file_record(con: sqlite3.Connection, owner: str, file_id: str) -> tuple[dict, str, int] | None:
    """(file object, path, lines) of the owner's file, or None (another owner's file is not there for them)."""
    row = con.execute("SELECT object, path, lines FROM files WHERE id = ? AND owner = ?", [file_id, owner]).fetchone()
    return (json.loads(row[0]), row[1], row[2]) if row else None


def list_files(con: sqlite3.Connection, owner: str, purpose: str | None, limit: int) -> list[dict]:
    cursor = con.execute("SELECT object FROM files WHERE owner = ? ORDER BY rowid DESC", [owner])
    objects = [json.loads(row[0]) for row in cursor]
    return [o for o in objects if purpose is None or o["purpose"] == purpose][:limit]


def remove_file(con: sqlite3.Connection, owner: str, file_id: str) -> None:
    con.execute("DELETE FROM files WHERE id = ? AND owner = ?", [file_id, owner])


# ---------------------------------------------------------------- batches


def add_batch(con: sqlite3.Connection, owner: str, batch: dict, priority: int, run: dict) -> None:
    con.execute(
        "INSERT INTO batches (id, owner, status, priority, object, run) VALUES (?, ?, ?, ?, ?, ?)",
        [batch["id"], owner, batch["status"], priority, json.dumps(batch), json.dumps(run)],
    )


def update_batch(con: sqlite3.Connection, batch_id: str, batch: dict, run: dict | None = None) -> dict:
    """Store the runner's view of a batch (and of its run), unless a cancel came in meanwhile: a batch
    asked to cancel stays `cancelling` until the runner stops it. Returns the batch as stored."""
    stored, _ = batch_record(con, batch_id)
    if stored["status"] == "cancelling" and batch["status"] in ("validating", "in_progress"):
        batch = {**batch, "status": "cancelling", "cancelling_at": stored["cancelling_at"]}
    con.execute("UPDATE batches SET status = ?, object = ? WHERE id = ?", [batch["status"], json.dumps(batch), batch_id])
    if run is not None:
        con.execute("UPDATE batches SET run = ? WHERE id = ?", [json.dumps(run), batch_id])
    return batch


def request_cancel(con: sqlite3.Connection, batch_id: str, owner: str, at: int) -> dict | None:
    """Mark a batch `cancelling` (the runner stops its run and ends it `cancelled`); None if it is not the owner's."""
    record = batch_record(con, batch_id, owner)
    if record is None:
        return None
    batch = record[0]
    if batch["status"] in ("validating", "in_progress"):
        batch = {**batch, "status": "cancelling", "cancelling_at": at}
        con.execute("UPDATE batches SET status = ?, object = ? WHERE id = ?", [batch["status"], json.dumps(batch), batch_id])
    return batch


def batch_record(con: sqlite3.Connection, batch_id: str, owner: str | None = None) -> tuple[dict, dict] | None:
    """(batch object, run record) — of this owner only, when one is given."""
    row = con.execute(
        "SELECT object, run FROM batches WHERE id = ? AND (owner = ? OR ? IS NULL)", [batch_id, owner, owner]
    ).fetchone()
    return (json.loads(row[0]), json.loads(row[1])) if row else None


def list_batches(con: sqlite3.Connection, owner: str, after: str | None, limit: int) -> list[dict]:
    """Newest first; `after` a batch id: those created before it (OpenAI's cursor)."""
    cursor = con.execute(
        """SELECT object FROM batches WHERE owner = ?
           AND seq < coalesce((SELECT seq FROM batches WHERE id = ? AND owner = ?), 9223372036854775807)
           ORDER BY seq DESC LIMIT ?""",
        [owner, after, owner, limit],
    )
    return [json.loads(row[0]) for row in cursor]


def batches_in(con: sqlite3.Connection, statuses: tuple[str, ...]) -> list[tuple[dict, dict]]:
    """Every owner's batches in these states, by priority then age: the runner's queue."""
    marks = ", ".join("?" * len(statuses))
    cursor = con.execute(f"SELECT object, run FROM batches WHERE status IN ({marks}) ORDER BY priority, seq", list(statuses))
    return [(json.loads(row[0]), json.loads(row[1])) for row in cursor]


def models_running(in_progress: list[tuple[dict, dict]]) -> set[str]:
    """Served models with a batch running now, from the in-progress batches (`batches_in`, any owner's):
    its run started."""
    return {batch["model"] for batch, run in in_progress if run.get("attempts") and batch.get("model")}
