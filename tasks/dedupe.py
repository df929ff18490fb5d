"""Dedupe: requests with the same (normalized) content share one canonical request and one output.

Exact: the text after Unicode NFKC, whitespace folding and optional case folding (lower case),
hashed to 16 bytes; the state across batches is one dict of those keys, so memory is ~100 bytes per unique
request. Near-duplicates: MinHash LSH over word shingles (see `near_duplicates`).
"""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from tasks.config import DedupeConfig
from tasks.load import REJECTED_SCHEMA


# Python's str.isspace() set after NFKC (which maps the other Unicode spaces to U+0020). Runs of
# two or more, or any single one that is not a plain space: single spaces need no rewrite, and
# skipping them makes the regex about 5x faster.
_WHITESPACE = r"[\t-\r\x{1c}-\x{20}\x{85}\x{1680}\x{2028}\x{2029}]"
_FOLDABLE_WHITESPACE = _WHITESPACE + r"{2,}|[\t-\r\x{1c}-\x{1f}\x{85}\x{1680}\x{2028}\x{2029}]"


def fold(texts: pa.Array) -> pa.Array:
    """NFKC, then runs of whitespace folded to one space and the ends trimmed (Arrow kernels, no Python per row)."""
    folded = pc.replace_substring_regex(pc.utf8_normalize(texts, "NFKC"), _FOLDABLE_WHITESPACE, " ")
    return pc.utf8_trim(folded, " ")


def needs_folding(texts: pa.Array) -> np.ndarray:
    """Rows that fold() could change, found over the Arrow buffers in numpy so clean text costs ~nothing.

    A row is a suspect when it holds a control byte (tabs, newlines...), a non-ASCII byte (maybe
    Unicode whitespace, maybe NFKC work), two spaces in a row, or a space at either end.
    """
    if not pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.large_string())
    offsets = np.frombuffer(texts.buffers()[1], np.int64)[texts.offset : texts.offset + len(texts) + 1]
    filled = np.flatnonzero(offsets[1:] > offsets[:-1])
    if len(filled) == 0:
        return filled
    data = np.frombuffer(texts.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    starts, ends = offsets[filled] - offsets[0], offsets[filled + 1] - offsets[0]
    suspect = np.logical_or.reduceat(data.view(np.int8) < 32, starts)  # bytes < 0x20 and >= 0x80 in one comparison
    suspect |= (data[starts] == 32) | (data[ends - 1] == 32)
    for start in (0, 1):  # two spaces in a row are one 16-bit word 0x2020, at an even or an odd offset
        words = data[start : start + (len(data) - start) // 2 * 2].view(np.uint16) == 0x2020
        if len(words):
            # A word across two rows makes the later one a suspect: the earlier ends with a space anyway.
            suspect |= np.logical_or.reduceat(words, np.minimum((starts - start).clip(0) // 2, len(words) - 1))
    return filled[suspect]


def sorted_groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct keys (sorted), the row of each one's first occurrence, and each row's group."""
    order = np.argsort(keys)  # not stable (2x faster): the first row of a group is its minimum
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(keys) else np.zeros(0, np.int64)
    group = np.empty(len(keys), np.int64)
    group[order] = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(keys)]))
    first = np.minimum.reduceat(order, starts) if len(keys) else starts
    return ordered[starts], first, group


class KeyIndex:
    """A map from uint64 hashes to int64 values: open addressing with linear probing, each
    operation one numpy pass per probe round over the whole batch (no Python per row).

    Keys are hashes already, so their low bits pick the slot; 0 marks an empty slot, so a key 0 is
    stored as 1 (callers confirm every match anyway). Kept at most half full: ~1.5 probes per key.
    """

    def __init__(self, capacity: int = 1 << 16):
        self.keys = np.zeros(capacity, np.uint64)
        self.values = np.full(capacity, -1, np.int64)
        self.size = 0

    def slots(self, keys: np.ndarray) -> np.ndarray:
        """Where each key is, or the empty slot where probing for it stops."""
        mask = len(self.keys) - 1
        slot = (keys & np.uint64(mask)).astype(np.int64)
        pending = np.arange(len(keys))
        while len(pending):
            held = self.keys[slot[pending]]
            pending = pending[(held != keys[pending]) & (held != 0)]
            slot[pending] = (slot[pending] + 1) & mask
        return slot

    @classmethod
    def for_keys(cls, expected: int | None) -> "KeyIndex":
        """Sized up front when the count is known: growing rehashes every key."""
        return cls(1 << max(16, (2 * (expected or 0)).bit_length()))

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where the key is absent."""
        keys = np.maximum(keys, np.uint64(1))
        return self.values[self.slots(keys)]

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Stores the (distinct) keys that are not there yet; keys already there keep their value."""
        self.setdefault(keys, values)

    def setdefault(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """For distinct keys: the value of each key present, -1 for the others, which are stored with their value."""
        keys = np.maximum(keys, np.uint64(1))
        if 2 * (self.size + len(keys)) > len(self.keys):
            self.grow(2 * (self.size + len(keys)))
        found = np.full(len(keys), -1, np.int64)
        pending = np.arange(len(keys))
        while len(pending):
            slot = self.slots(keys[pending])
            present = self.keys[slot] == keys[pending]
            found[pending[present]] = self.values[slot[present]]
            slot, pending = slot[~present], pending[~present]
            self.keys[slot] = keys[pending]  # keys that probed to the same empty slot: the last one lands
            landed = self.keys[slot] == keys[pending]
            self.values[slot[landed]] = values[pending[landed]]
            self.size += int(landed.sum())
            pending = pending[~landed]
        return found

    def grow(self, at_least: int) -> None:
        filled = np.flatnonzero(self.keys)
        keys, values = self.keys[filled], self.values[filled]
        capacity = len(self.keys)
        while capacity < at_least:
            capacity *= 4
        self.__init__(capacity)
        self.add(keys, values)


class ExactDeduper:
    """Marks each request with `duplicate_of` (the canonical custom_id, null for canonical ones).

    Stateful across batches so a dataset streams through in bounded batches; the first request
    seen with a given content is the canonical one. A repeated custom_id is rejected, since
    results join back to inputs by it — unless ids are derived from content, where a repeat is
    just a duplicate row and gets a numbered id.

    Contents and ids are indexed by a 64-bit hash (DuckDB's, vectorized). A match is confirmed
    with a second, independent hash of the content or with the id itself, so a hash collision
    can at worst miss a duplicate — it never merges two different requests. Per kept row the
    state is ~40 bytes plus its id.
    """

    def __init__(self, id_field: str | None = "id", config: DedupeConfig | None = None, expected_rows: int | None = None):
        self.id_field = id_field
        self.config = config or DedupeConfig()
        self.hasher = duckdb.connect()
        self.content_index = KeyIndex.for_keys(expected_rows)  # content hash -> position of its canonical request
        self.id_index = KeyIndex.for_keys(expected_rows)  # id hash -> position of the request with that id
        self.check_hashes = np.zeros(0, np.uint64)  # second content hash, by position (spare room at the end)
        self.ids: list[pa.Array] = []  # custom_id, by position (in chunks)
        self.count = 0  # requests kept so far: positions are 0..count-1
        self.repeats: dict[str, int] = {}  # how often a repeated id was seen

    def hashes(self, **columns: pa.Array) -> dict[str, np.ndarray]:
        """hash(column) for each column; for `text` also a check hash over the bytes shifted by one."""
        select = [f"hash({name}) AS {name}" for name in columns]
        if "text" in columns:
            select.append("hash(chr(1) || text) AS check")
        result = self.hasher.from_arrow(pa.table(columns)).select(", ".join(select)).to_arrow_table()
        return {name: result[name].to_numpy().copy() for name in result.column_names}  # writable

    def content_and_id_hashes(self, texts: pa.Array, custom_ids: pa.Array) -> dict[str, np.ndarray]:
        """Hashes of the normalized texts and of the ids."""
        if self.config.normalize and self.config.case_fold:
            texts = pc.utf8_lower(texts)
        if self.config.normalize and len(suspects := needs_folding(texts)):
            # Only the suspects are folded; one hashing query per batch (each costs ~2 ms on its own).
            folded = np.zeros(len(texts), bool)
            folded[suspects] = True
            texts = pc.replace_with_mask(texts, pa.array(folded), fold(texts.take(pa.array(suspects))))
        return self.hashes(id=custom_ids, text=texts)

    def ids_at(self, positions: np.ndarray) -> pa.Array:
        return pa.chunked_array(self.ids, pa.string()).take(pa.array(positions, pa.int64())).combine_chunks()

    def mark(self, requests: pa.Table) -> tuple[pa.Table, pa.Table]:
        text = requests["dedupe_text"] if "dedupe_text" in requests.column_names else requests["request_key"]
        custom_ids = requests["custom_id"].combine_chunks().cast(pa.string())
        hashes = self.content_and_id_hashes(text.combine_chunks(), custom_ids)
        ids, first_of_id, id_group = sorted_groups(hashes["id"])
        repeated = (np.bincount(id_group, minlength=len(ids)) > 1) | (self.id_index.get(ids) >= 0)
        rejected = REJECTED_SCHEMA.empty_table()
        if repeated.any():  # the rare path: settle the rows whose id may repeat, then index the final ids
            settled, rejected_rows = self.settle_repeated_ids(custom_ids, hashes["id"], np.flatnonzero(repeated[id_group]))
            requests = requests.set_column(requests.schema.get_field_index("custom_id"), "custom_id", settled)
            rejected = self.rejected_ids(requests.take(pa.array(rejected_rows, pa.int64())))
            kept = pa.array(np.setdiff1d(np.arange(requests.num_rows), rejected_rows))
            requests, custom_ids = requests.take(kept), settled.take(kept)
            hashes = {"text": hashes["text"][kept], "check": hashes["check"][kept], **self.hashes(id=custom_ids)}
            ids, first_of_id, _ = sorted_groups(hashes["id"])
        self.id_index.add(ids, self.count + first_of_id)
        self.ids.append(custom_ids)
        canonical = self.canonical_positions(hashes["text"], hashes["check"])
        marked = requests.append_column("duplicate_of", self.duplicate_of(canonical))
        self.count += marked.num_rows
        return marked, rejected

    def settle_repeated_ids(
        self, custom_ids: pa.Array, id_hashes: np.ndarray, suspects: np.ndarray
    ) -> tuple[pa.Array, list[int]]:
        """Row by row over the suspects: a repeated id is rejected, or numbered when ids are derived from content."""
        earlier = self.id_index.get(id_hashes[suspects])
        known = earlier >= 0
        known[known] = pc.equal(self.ids_at(earlier[known]), custom_ids.take(pa.array(suspects[known]))).to_numpy(False)
        settled = custom_ids.to_pylist()
        rejected, seen_in_batch = [], set()
        for row, seen_before in zip(suspects.tolist(), known.tolist()):
            custom_id = settled[row]
            seen = self.repeats.get(custom_id) or int(seen_before or custom_id in seen_in_batch)
            seen_in_batch.add(custom_id)
            if seen:
                self.repeats[custom_id] = seen + 1
            if seen and self.id_field:
                rejected.append(row)
            elif seen:
                settled[row] = f"{custom_id}-{seen + 1}"
        return pa.array(settled, pa.string()), rejected

    def canonical_positions(self, hashes: np.ndarray, check_hashes: np.ndarray) -> np.ndarray:
        """For each request of the batch, the position of the first request with its content."""
        positions = self.count + np.arange(len(hashes))
        if len(self.check_hashes) < self.count + len(hashes):  # grown by doubling: amortized O(1) per row
            grown = np.zeros(max(2 * len(self.check_hashes), self.count + len(hashes)), np.uint64)
            grown[: self.count] = self.check_hashes[: self.count]
            self.check_hashes = grown
        self.check_hashes[positions] = check_hashes
        keys, first, group = sorted_groups(hashes)
        earlier = self.content_index.setdefault(keys, positions[first])
        new = earlier < 0
        canonical = np.where(new, positions[first], earlier)[group]
        # A different content under the same 64-bit hash: keep it canonical rather than merge it.
        return np.where(self.check_hashes[canonical] == check_hashes, canonical, positions)

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


# ---------------------------------------------------------------- near-duplicates (MinHash LSH)

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: combines word hashes into a shingle hash


def shingle_hashes(texts: pa.Array, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Word k-shingles of each text as 64-bit hashes, flat, with row offsets (rensa's bulk input).

    Vectorized: each distinct word of the batch is hashed once in Python, shingles are combined in
    numpy. A text shorter than k words is one shingle of all its words.
    """
    words = pc.utf8_split_whitespace(texts)
    offsets = words.offsets.to_numpy().astype(np.int64)
    flat = words.flatten()
    if len(flat) == 0:
        return np.zeros(0, np.uint64), np.zeros(len(texts) + 1, np.uint64)
    encoded = pc.dictionary_encode(flat)
    hash64 = xxhash.xxh3_64_intdigest
    vocabulary = np.fromiter((hash64(w.encode()) for w in encoded.dictionary.to_pylist()), np.uint64, len(encoded.dictionary))
    word_hashes = vocabulary[encoded.indices.to_numpy()]
    lengths = np.diff(offsets)
    counts = np.where(lengths >= shingle_size, lengths - shingle_size + 1, np.minimum(lengths, 1))
    starts = np.repeat(offsets[:-1], counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    remaining = np.repeat(offsets[1:], counts) - starts
    shingles = np.zeros(len(starts), np.uint64)
    with np.errstate(over="ignore"):
        for position in range(shingle_size):
            valid = position < remaining
            index = np.minimum(starts + position, len(word_hashes) - 1)
            shingles = np.where(valid, shingles * _MIX + word_hashes[index], shingles)
    return shingles, np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)


def lsh_bands(threshold: float, num_perm: int, false_negative_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows per band) minimizing weighted false positives and negatives around the threshold.

    Misses weigh more than extra candidates: a candidate is checked against the signatures anyway.
    """
    grid = np.linspace(0, 1, 1001)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if rows == 0:
            break
        p = 1 - (1 - grid**rows) ** bands
        error = (1 - false_negative_weight) * error_fp(p, grid, threshold) + false_negative_weight * error_fn(p, grid, threshold)
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


def error_fp(p: np.ndarray, grid: np.ndarray, threshold: float) -> float:
    return float(np.trapezoid(p[grid < threshold], grid[grid < threshold]))


def error_fn(p: np.ndarray, grid: np.ndarray, threshold: float) -> float:
    return float(np.trapezoid(1 - p[grid >= threshold], grid[grid >= threshold]))


class NearDuplicateIndex:
    """Collects MinHash signatures batch by batch, then finds each text's canonical (earliest) near-duplicate.

    In memory: one 8-byte LSH key per band per text (~110 MB per million texts). The signatures
    themselves (4 bytes × num_perm per text) go to a scratch file and are read back only for the
    candidate pairs.
    """

    def __init__(self, config: DedupeConfig, scratch_file: str | None = None, seed: int = 42):
        import rensa  # the Rust MinHash: see bench/README.md for the comparison with datasketch

        self.rensa = rensa
        self.config = config
        self.seed = seed
        self.bands, self.rows = lsh_bands(config.threshold, config.num_perm)
        # The signature estimates Jaccard with a standard error of sqrt(J(1-J)/num_perm): accept
        # one standard error below the threshold so pairs right at it are kept, not coin-flipped.
        t = config.threshold
        self.accept = t - (t * (1 - t) / config.num_perm) ** 0.5
        self.scratch_file = scratch_file
        self.in_memory: list[np.ndarray] = []  # the signatures, when there is no scratch file
        self.band_keys: list[np.ndarray] = []
        self.count = 0
        if scratch_file:
            open(scratch_file, "wb").close()

    def add(self, texts: pa.Array, chunk: int = 8192) -> None:
        # Shingles split on whitespace anyway: NFKC and lower case are all the normalizing needed.
        if not pc.all(pc.string_is_ascii(texts)).as_py():
            texts = pc.utf8_normalize(texts, "NFKC")
        texts = pc.utf8_lower(texts)
        for start in range(0, len(texts), chunk):
            shingles, offsets = shingle_hashes(texts.slice(start, chunk), self.config.shingle_size)
            matrix = self.rensa.RMinHash.digest_matrix_from_flat_token_hashes(shingles, offsets, self.config.num_perm, self.seed)
            signatures = np.array(matrix.to_rows(), dtype=np.uint32).reshape(-1, self.config.num_perm)
            self.count += len(signatures)
            self.band_keys.append(self.keys_of(signatures))
            if self.scratch_file:
                with open(self.scratch_file, "ab") as handle:
                    handle.write(signatures.tobytes())
            else:
                self.in_memory.append(signatures)

    def keys_of(self, signatures: np.ndarray) -> np.ndarray:
        """One 64-bit key per band: texts sharing a key in any band are candidate pairs."""
        keys = np.zeros((len(signatures), self.bands), np.uint64)
        with np.errstate(over="ignore"):
            for band in range(self.bands):
                for column in range(band * self.rows, (band + 1) * self.rows):
                    keys[:, band] = keys[:, band] * _MIX + signatures[:, column].astype(np.uint64)
        return keys

    def signatures_of(self, positions: np.ndarray) -> np.ndarray:
        """The signatures of some texts; from the scratch file row by row, so memory stays small."""
        if not self.scratch_file:
            return np.concatenate(self.in_memory)[positions]
        size = 4 * self.config.num_perm
        with open(self.scratch_file, "rb") as handle:
            descriptor = handle.fileno()
            data = b"".join(os.pread(descriptor, size, int(position) * size) for position in positions)
        return np.frombuffer(data, np.uint32).reshape(len(positions), self.config.num_perm)

    def canonical(self) -> np.ndarray:
        """For each text (in the order added) the position of its canonical text (itself if none)."""
        parent = np.arange(self.count)
        if self.count == 0:
            return parent
        keys = np.concatenate(self.band_keys)
        pairs = []
        for band in range(self.bands):
            key = np.ascontiguousarray(keys[:, band])
            order = np.argsort(key, kind="stable")
            ordered = key[order]
            new_bucket = np.r_[True, ordered[1:] != ordered[:-1]]
            first = order[np.flatnonzero(new_bucket)][np.cumsum(new_bucket) - 1]
            candidate = np.empty(self.count, np.int64)
            candidate[order] = first  # the earliest text sharing this band's key
            later = np.flatnonzero(candidate < parent)
            pairs.append(np.stack([later, candidate[later]], axis=1))
        del keys
        pairs = np.unique(np.concatenate(pairs), axis=0)
        for start in range(0, len(pairs), 65_536):
            chunk = pairs[start : start + 65_536]
            similarity = (self.signatures_of(chunk[:, 0]) == self.signatures_of(chunk[:, 1])).mean(axis=1)
            verified = chunk[similarity >= self.accept]
            np.minimum.at(parent, verified[:, 0], verified[:, 1])
        while True:  # point every text at the root of its chain
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand
