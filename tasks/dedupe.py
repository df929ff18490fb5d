"""Dedupe: requests with the same (normalized) content share one canonical request and one output.

Exact: the text after Unicode NFKC, whitespace folding and optional case folding (lower case),
hashed to 16 bytes; the state across batches is one dict of those keys, so memory is ~100 bytes per unique
request. Near-duplicates: MinHash LSH over word shingles (see `near_duplicates`).
"""

from __future__ import annotations

import os
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from tasks.config import DedupeConfig
from tasks.load import REJECTED_SCHEMA


def fold(text: str) -> str:
    """NFKC, then runs of whitespace folded to one space and the ends trimmed."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())


def needs_folding(texts: pa.Array) -> np.ndarray:
    """Rows that fold() could change, found over the Arrow buffers in numpy so clean text costs ~nothing.

    A row is a suspect when it holds a control byte (tabs, newlines...), a non-ASCII byte (maybe
    Unicode whitespace, maybe NFKC work), two spaces in a row, or a space at either end.
    """
    if len(texts) == 0:
        return np.zeros(0, np.int64)
    if not pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.large_string())
    offsets = np.frombuffer(texts.buffers()[1], np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = np.frombuffer(texts.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    special = np.flatnonzero(data.view(np.int8) < 32)  # bytes < 0x20 and >= 0x80 in one comparison
    space = data == 32
    double = np.flatnonzero(space[1:] & space[:-1])
    rows = np.searchsorted(offsets, np.concatenate([special, double]), side="right") - 1
    filled = np.flatnonzero(offsets[1:] > offsets[:-1])
    edges = filled[space[offsets[filled]] | space[offsets[filled + 1] - 1]]
    return np.union1d(rows, edges)


def dedupe_keys(texts: pa.Array, config: DedupeConfig) -> list[bytes]:
    """16-byte keys (xxh3-128) of the normalized texts: collisions are out of reach at any dataset size."""
    if config.normalize and config.case_fold:
        texts = pc.utf8_lower(texts)
    raw = texts.cast(pa.large_binary()).to_pylist()  # bytes: hashed as they are, no re-encoding
    if config.normalize:
        for row in needs_folding(texts):
            raw[row] = fold(raw[row].decode()).encode()
    digest = xxhash.xxh3_128_digest
    return [digest(text) for text in raw]


class ExactDeduper:
    """Marks each request with `duplicate_of` (the canonical custom_id, null for canonical ones).

    Stateful across batches so a dataset streams through in bounded batches; the first request
    seen with a given content is the canonical one. A repeated custom_id is rejected, since
    results join back to inputs by it — unless ids are derived from content, where a repeat is
    just a duplicate row and gets a numbered id.
    """

    def __init__(self, id_field: str | None = "id", config: DedupeConfig | None = None):
        self.id_field = id_field
        self.config = config or DedupeConfig()
        self.canonical_by_key: dict[bytes, str] = {}
        self.seen_ids: set[str] = set()
        self.repeats: dict[str, int] = {}  # how often a repeated id was seen

    def mark(self, requests: pa.Table) -> tuple[pa.Table, pa.Table]:
        text = requests["dedupe_text"] if "dedupe_text" in requests.column_names else requests["request_key"]
        keys = dedupe_keys(text.combine_chunks(), self.config)
        custom_ids = requests["custom_id"].to_pylist()
        rejected: list[int] = []
        if self.seen_ids.isdisjoint(custom_ids) and len(set(custom_ids)) == len(custom_ids):  # the usual case, in C
            self.seen_ids.update(custom_ids)
        else:
            custom_ids, rejected = self.settle_repeated_ids(custom_ids)
            requests = requests.set_column(
                requests.schema.get_field_index("custom_id"), "custom_id", pa.array(custom_ids, pa.string())
            )
        if rejected:
            kept = sorted(set(range(len(custom_ids))) - set(rejected))
            keys, custom_ids = [keys[i] for i in kept], [custom_ids[i] for i in kept]
            marked = requests.take(pa.array(kept, pa.int64()))
        else:
            marked = requests
        canonical = self.canonical_by_key.setdefault
        duplicate_of = [None if (first := canonical(key, custom_id)) is custom_id else first for key, custom_id in zip(keys, custom_ids)]
        marked = marked.append_column("duplicate_of", pa.array(duplicate_of, type=pa.string()))
        return marked, self.rejected_ids(requests.take(pa.array(rejected, pa.int64())) if rejected else None)

    def settle_repeated_ids(self, custom_ids: list[str]) -> tuple[list[str], list[int]]:
        """Row by row: a repeated id is rejected, or numbered when ids are derived from content."""
        custom_ids = list(custom_ids)
        rejected = []
        for row, custom_id in enumerate(custom_ids):
            seen = self.repeats.get(custom_id, 1 if custom_id in self.seen_ids else 0)
            if seen:
                self.repeats[custom_id] = seen + 1
            self.seen_ids.add(custom_id)
            if seen and self.id_field:
                rejected.append(row)
            elif seen:
                custom_ids[row] = f"{custom_id}-{seen + 1}"
                self.seen_ids.add(custom_ids[row])
        return custom_ids, rejected

    def rejected_ids(self, rows: pa.Table | None) -> pa.Table:
        if rows is None:
            return REJECTED_SCHEMA.empty_table()
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
