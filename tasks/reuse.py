"""Reuse: what earlier work spares this run — read-only lookups, free of Prefect so the CLI can
ask them before it imports Prefect (see flows/__main__.py).

The input fingerprint names a prepared input and is recorded on its runs; the results file tells
whether a run already answered this very input, and which requests already have outputs.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from tasks.config import DatasetSpec
from tasks.load import filesystem, resolve_files
from tasks.render import Mode, content_hash


def input_fingerprint(dataset: DatasetSpec, mode: Mode, context_tokens: int | None) -> str:
    """The input as prepared: the spec, the prompt mode and context budget, and each source file's
    properties (fsspec's ukey: size and mtime on a local disk, the ETag on an object store)."""
    source_files = resolve_files(dataset.source)
    keys = {}
    for file in source_files:
        fs, path, _ = filesystem(file)
        keys[file] = fs.ukey(path)
    return content_hash({"spec": dataset.model_dump(mode="json"), "mode": mode, "context_tokens": context_tokens, "files": keys})


def answered_before(duckdb_path: str, input_fingerprint: str, model_fingerprint: str, sampling_hash: str) -> bool:
    """Whether a committed run already answered this very input with this model and sampling.

    Read-only and best effort: a file that is missing, older or busy answers False.
    """
    if not Path(duckdb_path).is_file():
        return False
    try:
        with duckdb.connect(duckdb_path, read_only=True) as con:
            if not has_column(con, "runs", "input_fingerprint"):  # written before migration 6
                return False
            found = con.execute(
                "SELECT count(*) FROM runs WHERE input_fingerprint = ? AND model_fingerprint = ? AND sampling_hash = ?",
                [input_fingerprint, model_fingerprint, sampling_hash],
            ).fetchone()
    except duckdb.Error:
        return False
    return found[0] > 0


def answered_keys(duckdb_path: str, model_fingerprint: str, sampling_hash: str) -> pa.Array | None:
    """Request keys that already have outputs for this model and sampling (read-only; None on a first run)."""
    if not Path(duckdb_path).is_file():
        return None
    with duckdb.connect(duckdb_path, read_only=True) as con:
        if not has_column(con, "outputs", "request_key"):
            return None
        keys = con.sql(
            "SELECT DISTINCT request_key FROM outputs WHERE model_fingerprint = ? AND sampling_hash = ?",
            params=[model_fingerprint, sampling_hash],
        ).to_arrow_table()["request_key"]
    return keys.combine_chunks() if len(keys) else None


def has_column(con: duckdb.DuckDBPyConnection, table: str, column: str) -> bool:
    found = con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?", [table, column]
    ).fetchall()
    return found[0][0] > 0
