"""Shard: cut the unique requests into content-addressed shards, one inference task each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from tasks.render import content_hash

# A shard holds what the engine needs and nothing that names the dataset, so the same requests
# in another dataset (or another version of this one) map to the same shard and its cached output.
SHARD_COLUMNS = ["request_key", "prompt", "messages", "overrides"]


class Shard(BaseModel):
    shard_key: str
    path: str
    requests: int


def shard_key(request_keys: list[str]) -> str:
    return content_hash(request_keys)


def cut_shards(
    unique_requests: Iterable[pa.Table], shard_size: int, max_shard_tokens: int | None = None
) -> Iterator[pa.Table]:
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
