"""Shard: cut the unique requests into content-addressed shards, one inference task each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel

# A shard holds what the engine needs and nothing that names the dataset, so the same requests
# in another dataset (or another version of this one) map to the same shard and its cached output.
SHARD_COLUMNS = ["request_key", "prompt", "messages", "overrides"]


# Requests are grouped by their first PREFIX_CHARS characters (≈ 64 tokens) into buckets of about
# PREFIX_BUCKET_ROWS rows, each sorted in memory: prompts sharing a prefix end up side by side
# without a global sort of the whole dataset.
PREFIX_CHARS = 256
PREFIX_BUCKET_ROWS = 131_072


class Shard(BaseModel):
    shard_key: str
    path: str
    requests: int


def cut_shards(unique_requests: Iterable[pa.Table], shard_size: int, max_shard_tokens: int | None = None) -> Iterator[pa.Table]:
    """Regroup a stream of request tables into shards of at most shard_size rows and max_shard_tokens.

    Tokens are approximated as characters / 4 (column `approx_tokens`; absent: no token budget):
    cheap, and close enough to balance shards. A request over the budget on its own gets a shard.
    """
    pending: list[pa.Table] = []
    pending_rows = pending_tokens = 0
    for table in unique_requests:
        tokens = table["approx_tokens"].to_numpy() if max_shard_tokens and "approx_tokens" in table.column_names else None
        table = table.select(SHARD_COLUMNS)
        start = 0
        while start < table.num_rows:
            take = min(shard_size - pending_rows, table.num_rows - start)
            if tokens is not None:
                cumulative = np.cumsum(tokens[start : start + take]) + pending_tokens
                fits = int(np.searchsorted(cumulative, max_shard_tokens, side="right"))
                take = max(fits, 1 if pending_rows == 0 else 0)
                pending_tokens = int(cumulative[take - 1]) if take else pending_tokens
            if take:
                pending.append(table.slice(start, take))
                pending_rows += take
                start += take
            if pending_rows and (pending_rows == shard_size or start < table.num_rows):  # full, or budget reached
                yield pa.concat_tables(pending).combine_chunks()
                pending, pending_rows, pending_tokens = [], 0, 0
    if pending_rows:
        yield pa.concat_tables(pending).combine_chunks()


def prefix_buckets(texts: pa.Array, buckets: int) -> np.ndarray:
    """The bucket of each text: a hash of its first PREFIX_CHARS characters, so a shared prefix shares a bucket."""
    hash64 = xxhash.xxh3_64_intdigest
    heads = pc.utf8_slice_codeunits(texts, 0, PREFIX_CHARS).to_pylist()
    return np.fromiter((hash64(head.encode()) % buckets for head in heads), np.int64, len(heads))


def order_by_prefix(tables: Iterable[pa.Table], scratch: str, buckets: int) -> Iterator[pa.Table]:
    """The same rows, those sharing a prefix together: bucketed to scratch files, each bucket sorted by text."""
    if buckets == 1:
        table = pa.concat_tables(list(tables))
        yield from sorted_by_text([table]) if table.num_rows else []
        return
    writers: dict[int, pq.ParquetWriter] = {}
    fs, root = fsspec.core.url_to_fs(scratch)
    fs.makedirs(root, exist_ok=True)
    try:
        for table in tables:
            assigned = prefix_buckets(table["dedupe_text"].combine_chunks(), buckets)
            for bucket in np.unique(assigned):
                if bucket not in writers:
                    writers[bucket] = pq.ParquetWriter(f"{root}/bucket-{bucket:05d}.parquet", table.schema, filesystem=fs)
                writers[bucket].write_table(table.filter(pa.array(assigned == bucket)))
    finally:
        for writer in writers.values():
            writer.close()
    for bucket in sorted(writers):
        path = f"{root}/bucket-{bucket:05d}.parquet"
        yield from sorted_by_text([pq.read_table(path, filesystem=fs)])
        fs.rm(path)


def sorted_by_text(tables: list[pa.Table]) -> list[pa.Table]:
    table = pa.concat_tables(tables)
    return [table.take(pc.sort_indices(table, [("dedupe_text", "ascending"), ("request_key", "ascending")]))]
