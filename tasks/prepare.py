"""Prepare: stream the dataset through load → render → dedupe → shard, writing Parquet parts.

The tasks here return small manifests (paths, keys, counts); the rows stay in files.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from pydantic import BaseModel

from tasks import files
from tasks.config import DatasetSpec
from tasks.dedupe import ExactDeduper
from tasks.load import check_dataset, iter_batches
from tasks.render import Mode, Renderer, template_hash
from tasks.shard import Shard, cut_shards, shard_key


class RequestSet(BaseModel):
    dataset_version: str
    template_hash: str
    request_files: list[str]
    rejected_files: list[str]
    rows_read: int
    requests: int
    unique_requests: int
    rejected: int

    @property
    def duplicates(self) -> int:
        return self.requests - self.unique_requests


class DatasetVersioner:
    """Content hash of a dataset as the pipeline sees it: every request and every rejected row."""

    def __init__(self) -> None:
        self.digest = hashlib.blake2b(digest_size=16)

    def add(self, requests: pa.Table, rejected: pa.Table) -> None:
        for table, columns in ((requests, ["custom_id", "request_key", "reference"]), (rejected, ["source_row", "reason"])):
            for row in zip(*(table[c].to_pylist() for c in columns)):
                # A reference is dataset content too; rows without one hash as they always did.
                self.digest.update("\t".join(str(value) for value in row if value is not None).encode() + b"\n")

    def version(self) -> str:
        return self.digest.hexdigest()


@task(name="write-requests")
def write_requests(dataset: DatasetSpec, mode: Mode, work_dir: str) -> RequestSet:
    """Load, render and dedupe the dataset into request and rejected-row Parquet parts."""
    source_files = check_dataset(dataset)
    renderer = Renderer(dataset, mode)
    deduper = ExactDeduper(id_field=dataset.id_column)
    versioner = DatasetVersioner()
    request_files: list[str] = []
    rejected_files: list[str] = []
    rows_read = requests = unique = rejected_count = 0
    for part, source in enumerate(iter_batches(dataset, source_files)):
        rendered, rejected = renderer.render(source)
        marked, duplicate_ids = deduper.mark(rendered)
        rejected = pa.concat_tables([rejected, duplicate_ids])
        versioner.add(marked, rejected)
        rows_read += source.batch.num_rows
        requests += marked.num_rows
        unique += marked.num_rows - pc.sum(pc.is_valid(marked["duplicate_of"])).as_py()
        rejected_count += rejected.num_rows
        request_files.append(files.join(work_dir, "requests", f"part-{part:05d}.parquet"))
        files.write_parquet(marked, request_files[-1])
        if rejected.num_rows:
            rejected_files.append(files.join(work_dir, "rejected", f"part-{part:05d}.parquet"))
            files.write_parquet(rejected, rejected_files[-1])
    return RequestSet(
        dataset_version=versioner.version(),
        template_hash=template_hash(dataset, mode),
        request_files=request_files,
        rejected_files=rejected_files,
        rows_read=rows_read,
        requests=requests,
        unique_requests=unique,
        rejected=rejected_count,
    )


def unique_requests(request_set: RequestSet):
    for path in request_set.request_files:
        table = files.read_parquet(path)
        yield table.filter(pc.is_null(table["duplicate_of"]))


@task(name="write-shards")
def write_shards(request_set: RequestSet, shard_size: int, storage: str) -> list[Shard]:
    """Cut the unique requests into shard files named by their content (kept: the cache refers to them)."""
    shards = []
    for table in cut_shards(unique_requests(request_set), shard_size):
        key = shard_key(table["request_key"].to_pylist())
        path = files.join(storage, "shards", f"{key}.parquet")
        if not files.exists(path):
            files.write_parquet(table, path)
        shards.append(Shard(shard_key=key, path=path, requests=table.num_rows))
    return shards
