"""Exact dedupe: requests with the same content share one canonical request and one output.

By default the same content is the same request as the engine receives it: its request_key, the
hash of the request's canonical JSON. With `match: normalized`, the request's text (dedupe_text,
an unambiguous flattening) after Unicode NFKC, whitespace folding and optional case folding.
Either is hashed (xxh64 under two seeds); the state across batches is a hash table of those keys,
~100 bytes per request. Near-duplicates are found afterwards, in `near_dedupe`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.config import DedupeConfig
from tasks.prepare.sources import REJECTED_SCHEMA

# The exact dedupe's loops (tasks.prepare.kernels, numba) are imported where they run, not at the top: a
# script that imports the flows is imported again by vLLM's spawned CPU worker, whose start-up scan
# of every loaded module fails on llvmlite's library proxy ("'_lib_fn_wrapper' object has no
# attribute 'get'"), so the engine would not start.


class ExactDeduper:
    """Marks each request with `duplicate_of` (the canonical custom_id, null for canonical ones).

    Stateful across batches so a dataset streams through in bounded batches; the first request
    seen with a given content is the canonical one. A repeated custom_id is rejected, since
    results join back to inputs by it — unless ids are derived from content, where a repeat is
    just a duplicate row and gets a numbered id.

    Contents and ids are indexed by their hashes (see HashIndex). Per kept row the state is ~100
    bytes plus its id.
    """

    def __init__(self, id_field: str | None = "id", config: DedupeConfig | None = None, expected_rows: int | None = None):
        from tasks.prepare.kernels import HashIndex

        self.id_field = id_field
        self.config = config or DedupeConfig()
        self.content_index = HashIndex(expected_rows)  # content -> position of its canonical request
        self.id_index = HashIndex(expected_rows)  # id -> number of the first row read with it
        self.ids: list[pa.Array] = []  # custom_id, by position (in chunks)
        self.count = 0  # requests kept so far: positions are 0..count-1
        self.rows_read = 0
        self.repeats: dict[str, int] = {}  # how often a repeated id was seen

    def content_hashes(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """The 128-bit hash of each normalized text: only the rows that normalizing can change are normalized."""
        from tasks.prepare.kernels import fold, suspect_rows, text_hashes

        if self.config.case_fold:
            texts = pc.utf8_lower(texts)
        suspects = suspect_rows(texts)
        if len(suspects) == len(texts) > 0:  # multi-line prompts, say
            return text_hashes(fold(texts))
        hashes, checks = text_hashes(texts)
        if len(suspects):
            hashes[suspects], checks[suspects] = text_hashes(fold(texts.take(pa.array(suspects))))
        return hashes, checks

    def ids_at(self, positions: np.ndarray) -> pa.Array:
        return pa.chunked_array(self.ids, pa.string()).take(pa.array(positions, pa.int64())).combine_chunks()

    def mark(self, requests: pa.Table) -> tuple[pa.Table, pa.Table]:
        custom_ids = requests["custom_id"].combine_chunks().cast(pa.string())
        from tasks.prepare.kernels import text_hashes

        hashes = dict(zip(["id", "id_check"], text_hashes(custom_ids)))
        if self.config.match == "normalized":
            content = self.content_hashes(requests["dedupe_text"].combine_chunks())
        else:  # the request as sent: the hash of its canonical JSON
            content = text_hashes(requests["request_key"].combine_chunks())
        hashes.update(zip(["text", "text_check"], content))
        row_numbers = self.rows_read + np.arange(requests.num_rows)
        self.rows_read += requests.num_rows
        repeated = np.flatnonzero(self.id_index.setdefault(hashes["id"], hashes["id_check"], row_numbers) != row_numbers)
        rejected = REJECTED_SCHEMA.empty_table()
        if len(repeated):  # the rare path, row by row
            settled, rejected_rows = self.settle_repeated_ids(custom_ids, repeated)
            requests = requests.set_column(requests.schema.get_field_index("custom_id"), "custom_id", settled)
            rejected = self.rejected_ids(requests.take(pa.array(rejected_rows, pa.int64())))
            kept = np.setdiff1d(np.arange(requests.num_rows), rejected_rows)
            requests, custom_ids = requests.take(pa.array(kept)), settled.take(pa.array(kept))
            hashes = {name: values[kept] for name, values in hashes.items()}
        self.ids.append(custom_ids)
        positions = self.count + np.arange(requests.num_rows)
        canonical = self.content_index.setdefault(hashes["text"], hashes["text_check"], positions)
        marked = requests.append_column("duplicate_of", self.duplicate_of(canonical))
        self.count += marked.num_rows
        return marked, rejected

    def settle_repeated_ids(self, custom_ids: pa.Array, repeated: np.ndarray) -> tuple[pa.Array, list[int]]:
        """A repeated id is rejected, or numbered when ids are derived from content.

        A numbered id is not indexed: no derived id (`row-<hex digest>`) can look like `row-<hex digest>-2`.
        """
        settled = custom_ids.to_pylist()
        rejected = []
        for row in repeated.tolist():
            custom_id = settled[row]
            self.repeats[custom_id] = self.repeats.get(custom_id, 1) + 1
            if self.id_field:
                rejected.append(row)
            else:
                settled[row] = f"{custom_id}-{self.repeats[custom_id]}"
        return pa.array(settled, pa.string()), rejected

    def duplicate_of(self, canonical: np.ndarray) -> pa.Array:
        duplicates = np.flatnonzero(canonical != self.count + np.arange(len(canonical)))
        pick = np.full(len(canonical), len(duplicates))  # the last slot holds the null of canonical rows
        pick[duplicates] = np.arange(len(duplicates))
        choices = pa.concat_arrays([self.ids_at(canonical[duplicates]), pa.nulls(1, pa.string())])
        return choices.take(pa.array(pick))

    def rejected_ids(self, rows: pa.Table) -> pa.Table:
        return pa.table(
            {
                "source_file": rows["source_file"],
                "source_row": rows["source_row"],
                "custom_id": rows["custom_id"],
                "field": pa.array([self.id_field] * rows.num_rows, pa.string()),
                "reason": pa.array([f"duplicate id '{i}'" for i in rows["custom_id"].to_pylist()], pa.string()),
            },
            schema=REJECTED_SCHEMA,
        )
