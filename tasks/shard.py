"""Shard: cut the unique requests into content-addressed shards, one inference task each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa
from pydantic import BaseModel

from tasks.render import content_hash

# A shard holds what the engine needs and nothing that names the dataset, so the same requests
# in another dataset (or another version of this one) map to the same shard and its cached output.
SHARD_COLUMNS = ["request_key", "prompt", "messages"]


class Shard(BaseModel):
    shard_key: str
    path: str
    requests: int


def shard_key(request_keys: list[str]) -> str:
    return content_hash(request_keys)


def cut_shards(unique_requests: Iterable[pa.Table], shard_size: int) -> Iterator[pa.Table]:
    """Regroup a stream of request tables into tables of exactly shard_size rows (the last may be short)."""
    pending: list[pa.Table] = []
    pending_rows = 0
    for table in unique_requests:
        table = table.select(SHARD_COLUMNS)
        while table.num_rows:
            take = min(shard_size - pending_rows, table.num_rows)
            pending.append(table.slice(0, take))
            pending_rows += take
            table = table.slice(take)
            if pending_rows == shard_size:
                yield pa.concat_tables(pending).combine_chunks()
                pending, pending_rows = [], 0
    if pending_rows:
        yield pa.concat_tables(pending).combine_chunks()
