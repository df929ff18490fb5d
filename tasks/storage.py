"""Files on the result storage: a local folder by default, any fsspec URL (s3://...) too.

Every file is written atomically (under a temporary name, then moved into place), so a reader —
or a run resumed after a crash — never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import socket
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def join(base: str, *parts: str) -> str:
    """base/part/...; a part never climbs out of base, so a name from a parameter (an export's run,
    a curated dataset) cannot put a file outside its folder."""
    for part in parts:
        if part.startswith(("/", "~")) or ".." in part.split("/"):
            raise ValueError(f"{part!r} would leave the folder {base}: names may not be absolute or contain '..'")
    return "/".join([base.rstrip("/"), *parts])


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path in it). Folder listings are never remembered: workers on other machines write
    into the same folders (an object store's listing kept from before would hide their files)."""
    return fsspec.core.url_to_fs(path, use_listings_cache=False)


def exists(path: str) -> bool:
    fs, fs_path = filesystem(path)
    return fs.exists(fs_path)


# A partial file is named after its writer (path.<uuid>.<pid>.<host>.partial), so the next writer of
# the same path can tell the leftovers of a killed write from a partial file still being written.
HOST = socket.gethostname()


def partial_name(fs_path: str) -> str:
    return f"{fs_path}.{uuid.uuid4().hex}.{os.getpid()}.{HOST}.partial"


def remove_leftovers(fs: fsspec.AbstractFileSystem, fs_path: str) -> None:
    """Remove partial files of `fs_path` left by writers on this machine that died mid-write."""
    if not isinstance(fs, LocalFileSystem):  # an object store publishes nothing of an upload that died
        return
    pattern = re.compile(rf"{re.escape(fs_path)}\.[0-9a-f]{{32}}\.(\d+)\.{re.escape(HOST)}\.partial")
    for leftover in glob.glob(f"{glob.escape(fs_path)}.*.partial"):
        found = pattern.fullmatch(leftover)
        if found and not process_alive(int(found[1])):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def synced(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Force a local file (or folder: its entries) to disk, so a rename after it publishes complete data
    even across a power loss; an object store's upload is durable once it returns."""
    if isinstance(fs, LocalFileSystem):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """(filesystem, temporary path) to write; synced and moved to `path` once the block succeeds,
    removed if it fails. Leftovers of earlier writers of `path` that were killed are removed first."""
    fs, fs_path = filesystem(path)
    folder = fs_path.rsplit("/", 1)[0]
    fs.makedirs(folder, exist_ok=True)
    remove_leftovers(fs, fs_path)
    partial = partial_name(fs_path)
    try:
        yield fs, partial
        synced(fs, partial)
        fs.mv(partial, fs_path)
    except BaseException:
        if fs.exists(partial):
            fs.rm(partial)
        raise
    synced(fs, folder)


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file `path` (created if missing, never removed) for the
    block: another process asking for the same lock waits until this one lets go, or dies — the
    kernel releases a killed holder's lock, so none is ever left stale. An object store (s3://...)
    has no such lock: there the block runs unlocked."""
    fs, fs_path = filesystem(path)
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    os.makedirs(os.path.dirname(fs_path), exist_ok=True)
    # Never removed: a waiter would then hold a lock on a file no newcomer opens.
    with open(fs_path, "a") as handle:  # closing it lets go
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


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
    fs, fs_path = filesystem(path)
    return pq.read_table(fs_path, filesystem=fs, columns=columns)


def read_schema(path: str) -> pa.Schema:
    """A Parquet file's schema, from its footer (no rows read)."""
    fs, fs_path = filesystem(path)
    return pq.read_schema(fs_path, filesystem=fs)


def parquet_dataset(paths: list[str]) -> ds.Dataset:
    """The Parquet files (of one storage) as one dataset, read lazily: columns matched by name, a column
    some files lack is null there. What DuckDB reads them through (it opens no s3:// URL itself)."""
    fs, _ = filesystem(paths[0])
    arrow_fs = None if isinstance(fs, LocalFileSystem) else fs  # Arrow's own local files are faster
    fs_paths = [filesystem(path)[1] for path in paths]
    schemas = [pq.read_schema(path, filesystem=arrow_fs) for path in fs_paths]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    return ds.dataset(fs_paths, schema=schema, format="parquet", filesystem=arrow_fs)


def list_files(folder: str, suffix: str) -> list[str]:
    """The complete files in a folder whose names end with suffix (none when the folder is missing)."""
    fs, fs_path = filesystem(folder)
    if not fs.exists(fs_path):
        return []
    protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    return sorted(protocol + name for name in fs.ls(fs_path, detail=False) if name.endswith(suffix))


def read_text(path: str) -> str:
    fs, fs_path = filesystem(path)
    return fs.cat_file(fs_path).decode()


def remove_tree(path: str) -> None:
    fs, fs_path = filesystem(path)
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)
