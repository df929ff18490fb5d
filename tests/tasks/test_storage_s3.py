"""The file layer on an object store: a real S3-compatible server (moto) on 127.0.0.1, reached through
s3fs with the standard AWS variables, and other processes writing the same bucket as other machines would."""

import os
import subprocess
import sys

import fsspec
import pyarrow as pa
import pytest

from tasks import storage
from tasks.cluster import REPO


def in_another_process(code: str, *args: str) -> None:
    """Run code in a new Python process (another machine, as far as the bucket can tell)."""
    subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def bucket_keys(url: str) -> list[str]:
    return sorted(fsspec.filesystem("s3", skip_instance_cache=True).find(url))


def test_files_round_trip_through_the_bucket(s3_bucket):
    root = storage.join(s3_bucket, "storage")
    table = pa.table({"request_key": ["a", "b"], "text": ["x", None]})
    storage.write_parquet(table, storage.join(root, "outputs", "one.parquet"))
    storage.write_text('{"ok": 1}', storage.join(root, "outputs", "one.json"))
    storage.write_bytes(b"\x89PNG", storage.join(root, "comparisons", "c.png"))

    assert storage.read_parquet(storage.join(root, "outputs", "one.parquet")).equals(table)
    assert storage.read_parquet(storage.join(root, "outputs", "one.parquet"), ["text"]).column_names == ["text"]
    assert storage.read_text(storage.join(root, "outputs", "one.json")) == '{"ok": 1}'
    assert storage.list_files(storage.join(root, "outputs"), ".parquet") == [f"{root}/outputs/one.parquet"]
    assert storage.list_files(storage.join(root, "missing"), ".parquet") == []
    assert storage.exists(storage.join(root, "outputs", "one.json"))
    # only the files themselves: no temporary name is left behind
    assert bucket_keys(s3_bucket) == [
        f"{s3_bucket[5:]}/storage/comparisons/c.png",
        f"{s3_bucket[5:]}/storage/outputs/one.json",
        f"{s3_bucket[5:]}/storage/outputs/one.parquet",
    ]

    storage.remove_tree(storage.join(root, "outputs"))
    assert not storage.exists(storage.join(root, "outputs", "one.json"))
    assert storage.list_files(storage.join(root, "outputs"), ".parquet") == []
    assert bucket_keys(s3_bucket) == [f"{s3_bucket[5:]}/storage/comparisons/c.png"]


def test_a_write_that_fails_midway_leaves_neither_the_file_nor_a_part_of_it(s3_bucket):
    path = storage.join(s3_bucket, "outputs", "one.json")
    with pytest.raises(RuntimeError, match="disk full"), storage.atomic_writer(path, "w") as handle:
        handle.write("half a manif")
        raise RuntimeError("disk full")
    assert not storage.exists(path)
    assert bucket_keys(s3_bucket) == []


def test_files_another_process_writes_are_seen_after_this_one_has_looked(s3_bucket):
    """Workers on other machines write manifests and journal parts into folders this process has already
    listed (the run's process waits for them): what it sees must be the bucket, not a listing it remembers."""
    folder = storage.join(s3_bucket, "outputs")
    storage.write_text("mine", storage.join(folder, "mine.json"))
    assert storage.list_files(folder, ".json") == [f"{folder}/mine.json"]
    assert not storage.exists(storage.join(folder, "theirs.json"))

    in_another_process(
        "import sys; from tasks import storage; storage.write_text('theirs', sys.argv[1])", storage.join(folder, "theirs.json")
    )

    assert storage.exists(storage.join(folder, "theirs.json"))
    assert storage.read_text(storage.join(folder, "theirs.json")) == "theirs"
    assert storage.list_files(folder, ".json") == [f"{folder}/mine.json", f"{folder}/theirs.json"]

    in_another_process("import sys; from tasks import storage; storage.remove_tree(sys.argv[1])", folder)
    assert not storage.exists(storage.join(folder, "theirs.json"))
    assert storage.list_files(folder, ".json") == []


def test_prefix_buckets_of_a_large_run_go_through_the_bucket_and_leave_nothing(s3_bucket):
    """A run of more than PREFIX_BUCKET_ROWS requests orders them through scratch files in its work folder."""
    from tasks.prepare.shard import order_by_prefix

    texts = [f"{'abc'[i % 3]} prompt {i}" for i in range(300)]
    tables = [
        pa.table({"request_key": [f"k{i}" for i in range(s, s + 100)], "dedupe_text": texts[s : s + 100]}) for s in (0, 100, 200)
    ]
    ordered = pa.concat_tables(order_by_prefix(iter(tables), storage.join(s3_bucket, "work", "run", "prefix-buckets"), 4))
    assert sorted(ordered["request_key"].to_pylist()) == sorted(f"k{i}" for i in range(300))
    assert bucket_keys(s3_bucket) == []
