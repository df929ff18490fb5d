"""Near-duplicate dedupe: MinHash LSH over word shingles, candidate pairs checked against the signatures."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from tasks.config import DedupeConfig

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
