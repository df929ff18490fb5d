"""Files on the result storage: a local folder by default, any fsspec URL (s3://...) too.

Every file is written atomically (under a temporary name, then moved into place), so a reader —
or a run resumed after a crash — never sees half a file.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(path: str) -> bool:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.exists(fs_path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """(filesystem, temporary path) to write; moved to `path` once the block succeeds, removed if it fails."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
    partial = f"{fs_path}.{uuid.uuid4().hex}.partial"
    try:
        yield fs, partial
    except BaseException:
        if fs.exists(partial):
            fs.rm(partial)
        raise
    fs.mv(partial, fs_path)


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file handle whose file appears under its name only once it is complete."""
    with atomic_path(path) as (fs, partial), fs.open(partial, mode) as handle:
        yield handle


def write_parquet(table: pa.Table, path: str) -> None:
    with atomic_path(path) as (fs, partial):
        pq.write_table(table, partial, filesystem=fs, compression="zstd")


def write_text(text: str, path: str) -> None:
    with atomic_writer(path, "w") as handle:
        handle.write(text)


def write_bytes(data: bytes, path: str) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return pq.read_table(fs_path, filesystem=fs, columns=columns)


def list_files(folder: str, suffix: str) -> list[str]:
    """The complete files in a folder whose names end with suffix (none when the folder is missing)."""
    fs, fs_path = fsspec.core.url_to_fs(folder)
    if not fs.exists(fs_path):
        return []
    protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    return sorted(protocol + name for name in fs.ls(fs_path, detail=False) if name.endswith(suffix))


def read_text(path: str) -> str:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.cat_file(fs_path).decode()


def remove_tree(path: str) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)
