"""Parquet files on the result storage: a local folder by default, any fsspec URL (s3://...) too."""

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


def write_parquet(table: pa.Table, path: str) -> None:
    """Write atomically: readers (and a crash mid-write) never see a half-written file."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
    partial = f"{fs_path}.{uuid.uuid4().hex}.partial"
    pq.write_table(table, partial, filesystem=fs, compression="zstd")
    fs.mv(partial, fs_path)


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return pq.read_table(fs_path, filesystem=fs, columns=columns)


def remove_tree(path: str) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file that appears under its name only once it is complete (like write_parquet)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
    partial = f"{fs_path}.{uuid.uuid4().hex}.partial"
    try:
        with fs.open(partial, mode) as handle:
            yield handle
    except BaseException:
        fs.rm(partial)
        raise
    fs.mv(partial, fs_path)


def move(source: str, target: str) -> None:
    fs, source_path = fsspec.core.url_to_fs(source)
    fs.mv(source_path, fsspec.core.url_to_fs(target)[1])


def make_parent(path: str) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)


def write_text(text: str, path: str) -> None:
    with atomic_writer(path, "w") as handle:
        handle.write(text)


def read_text(path: str) -> str:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.cat_file(fs_path).decode()
