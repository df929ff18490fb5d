"""Compiled (numba) loops for the exact dedupe, the per-row work that Arrow and numpy have no kernel for.

They read Arrow string buffers in place, run without the GIL (the read-ahead thread keeps reading
meanwhile), and are cached on disk after their first compilation. They write into arrays their
callers allocate: allocating inside a loop made it up to 10x slower here.
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# xxh64's primes (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md).
P1 = np.uint64(11400714785074694791)
P2 = np.uint64(14029467366897019727)
P3 = np.uint64(1609587929392839161)
P4 = np.uint64(9650029242287828579)
P5 = np.uint64(2870177450012600261)
CHECK_SEED = 0x5EED  # the second hash of a text: xxh64 under another seed

BYTES = np.uint64(0x0101010101010101)
HIGH_BITS = BYTES * np.uint64(0x80)
LOW_BITS = BYTES * np.uint64(0x7F)
SPACES = BYTES * np.uint64(0x20)


def string_buffers(texts: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, data as bytes, data as whole 64-bit words) of a string array, without copying the text."""
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = texts.cast(pa.large_string())
    offsets_type = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], offsets_type)[texts.offset : texts.offset + len(texts) + 1]
    offsets = offsets.astype(np.int64)  # one type: each loop compiles once (~1 s per type on first use)
    buffer = texts.buffers()[2]
    if buffer is None or buffer.size == 0:
        return offsets, np.zeros(8, np.uint8), np.zeros(1, np.uint64)
    return offsets, np.frombuffer(buffer, np.uint8), np.frombuffer(buffer, np.uint64, count=buffer.size // 8)


@numba.njit(inline="always")
def load_words(data, words, at):
    """The 8 bytes from `at` as a little-endian word, from two aligned words: `at` must be 16 bytes before the last word's end."""
    word, shift = at >> 3, np.uint64((at & 7) * 8)
    return words[word] if shift == 0 else (words[word] >> shift) | (words[word + 1] << (np.uint64(64) - shift))


@numba.njit(inline="always")
def load_bytes(data, words, at):
    """The same, byte by byte, with zeros past the buffer's end (a separate loop: it is only for the last rows)."""
    value = np.uint64(0)
    for i in range(min(8, len(data) - at)):
        value |= np.uint64(data[at + i]) << np.uint64(8 * i)
    return value


@numba.njit(inline="always")
def rotate_left(x, bits):
    return (x << np.uint64(bits)) | (x >> np.uint64(64 - bits))


@numba.njit(inline="always")
def xxh64_round(accumulator, lane):
    return rotate_left(accumulator + lane * P2, 31) * P1


@numba.njit(inline="always")
def xxh64_merge(accumulator, lane):
    return (accumulator ^ xxh64_round(np.uint64(0), lane)) * P1 + P4


def xxh64_with(load64):
    """XXH64 of data[start:end] under two seeds in one pass (each equal to the xxhash package's
    xxh64_intdigest: tested), loading words with `load64`."""

    @numba.njit(inline="always")
    def finish(h, data, words, at, end):
        while at + 8 <= end:
            h = rotate_left(h ^ xxh64_round(np.uint64(0), load64(data, words, at)), 27) * P1 + P4
            at += 8
        if at + 4 <= end:
            h = rotate_left(h ^ (load64(data, words, at) & np.uint64(0xFFFFFFFF)) * P1, 23) * P2 + P3
            at += 4
        while at < end:
            h = rotate_left(h ^ np.uint64(data[at]) * P5, 11) * P1
            at += 1
        h = (h ^ (h >> np.uint64(33))) * P2
        h = (h ^ (h >> np.uint64(29))) * P3
        return h ^ (h >> np.uint64(32))

    @numba.njit(inline="always")
    def xxh64_twice(data, words, start, end, seed, other_seed):
        at = start
        if end - start >= 32:
            v1, v2, v3, v4 = seed + P1 + P2, seed + P2, seed, seed - P1
            u1, u2, u3, u4 = other_seed + P1 + P2, other_seed + P2, other_seed, other_seed - P1
            while at + 32 <= end:
                lane1, lane2 = load64(data, words, at), load64(data, words, at + 8)
                lane3, lane4 = load64(data, words, at + 16), load64(data, words, at + 24)
                v1, v2, v3, v4 = xxh64_round(v1, lane1), xxh64_round(v2, lane2), xxh64_round(v3, lane3), xxh64_round(v4, lane4)
                u1, u2, u3, u4 = xxh64_round(u1, lane1), xxh64_round(u2, lane2), xxh64_round(u3, lane3), xxh64_round(u4, lane4)
                at += 32
            h = rotate_left(v1, 1) + rotate_left(v2, 7) + rotate_left(v3, 12) + rotate_left(v4, 18)
            h = xxh64_merge(xxh64_merge(xxh64_merge(xxh64_merge(h, v1), v2), v3), v4)
            g = rotate_left(u1, 1) + rotate_left(u2, 7) + rotate_left(u3, 12) + rotate_left(u4, 18)
            g = xxh64_merge(xxh64_merge(xxh64_merge(xxh64_merge(g, u1), u2), u3), u4)
        else:
            h, g = seed + P5, other_seed + P5
        length = np.uint64(end - start)
        return finish(h + length, data, words, at, end), finish(g + length, data, words, at, end)

    return xxh64_twice


xxh64_twice_from_words, xxh64_twice_from_bytes = xxh64_with(load_words), xxh64_with(load_bytes)


@numba.njit(nogil=True, cache=True)
def _hash_rows(offsets, data, words, seed, check_seed, hashes, checks):
    for row in range(len(offsets) - 1):
        start, end = offsets[row], offsets[row + 1]
        if end + 16 <= 8 * len(words):
            hashes[row], checks[row] = xxh64_twice_from_words(data, words, start, end, np.uint64(seed), np.uint64(check_seed))
        else:
            hashes[row], checks[row] = xxh64_twice_from_bytes(data, words, start, end, np.uint64(seed), np.uint64(check_seed))


def text_hashes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of each text (xxh64 under two seeds): together a 128-bit key."""
    hashes, checks = np.empty(len(texts), np.uint64), np.empty(len(texts), np.uint64)
    _hash_rows(*string_buffers(texts), 0, CHECK_SEED, hashes, checks)
    return hashes, checks


@numba.njit(inline="always")
def zero_bytes(word):
    """The high bit of each byte that is zero, and no other bit (no carry crosses bytes)."""
    return ~(((word & LOW_BITS) + LOW_BITS) | word | LOW_BITS)


@numba.njit(nogil=True, cache=True)
def _suspect_rows(offsets, data, words, suspect):
    for row in range(len(offsets) - 1):
        start, end = offsets[row], offsets[row + 1]
        if start == end:
            continue
        if data[start] == 32 or data[end - 1] == 32:
            suspect[row] = True
            continue
        at, space_before = start, np.uint64(0)
        while at + 8 <= end and at + 16 <= 8 * len(words) and not suspect[row]:
            word = load_words(data, words, at)
            # A byte below 0x20 borrows into its high bit, a byte from 0x80 has it: exact, as a test for any.
            spaces = zero_bytes(word ^ SPACES)
            suspect[row] = ((word - SPACES) | word) & HIGH_BITS != 0 or (
                spaces & ((spaces >> np.uint64(8)) | (space_before >> np.uint64(56)))
            ) != 0
            space_before = spaces
            at += 8
        previous = np.uint8(32) if space_before >> np.uint64(63) else np.uint8(0)
        while at < end and not suspect[row]:
            byte = data[at]
            suspect[row] = byte < 32 or byte >= 128 or (byte == 32 and previous == 32)
            previous = byte
            at += 1


def suspect_rows(texts: pa.Array) -> np.ndarray:
    """Rows holding a control byte (tabs, newlines...), a non-ASCII byte (maybe Unicode whitespace,
    maybe NFKC work), two spaces in a row, or a space at either end: the only rows that NFKC and
    whitespace folding can change."""
    suspect = np.zeros(len(texts), np.bool_)
    _suspect_rows(*string_buffers(texts), suspect)
    return np.flatnonzero(suspect)


@numba.njit(inline="always")
def whitespace_width(data, at, end):
    """Bytes of the whitespace character at `at` (0: none): Python's str.isspace() set after NFKC,
    which maps the other Unicode spaces to U+0020."""
    byte = data[at]
    if 32 < byte < 0xC2:  # most bytes: printable ASCII (or inside a character), tested first
        return 0
    if byte <= 32:
        return 1 if 9 <= byte <= 13 or byte >= 28 else 0
    if byte == 0xC2 and at + 1 < end and data[at + 1] == 0x85:  # U+0085
        return 2
    if byte == 0xE1 and at + 2 < end and data[at + 1] == 0x9A and data[at + 2] == 0x80:  # U+1680
        return 3
    if (
        byte == 0xE2 and at + 2 < end and data[at + 1] == 0x80 and (data[at + 2] == 0xA8 or data[at + 2] == 0xA9)
    ):  # U+2028, U+2029
        return 3
    return 0


@numba.njit(nogil=True, cache=True)
def _fold_whitespace(offsets, data, folded_offsets, folded):
    size = 0
    for row in range(len(offsets) - 1):
        folded_offsets[row] = row_start = size
        at, end, space = np.int64(offsets[row]), np.int64(offsets[row + 1]), False
        while at < end:
            width = whitespace_width(data, at, end)
            if width > 0:
                space = size > row_start  # a space only between words: the ends are trimmed
                at += width
            else:
                if space:
                    folded[size] = 32
                    size += 1
                    space = False
                folded[size] = data[at]
                size += 1
                at += 1
    folded_offsets[-1] = size


def fold(texts: pa.Array) -> pa.Array:
    """NFKC, then runs of whitespace folded to one space and the ends trimmed."""
    return fold_whitespace(pc.utf8_normalize(texts, "NFKC"))


def fold_whitespace(texts: pa.Array) -> pa.Array:
    """Each run of whitespace folded to one space, the ends trimmed, as a large_string array."""
    offsets, data, _ = string_buffers(texts)
    folded_offsets, folded = np.empty(len(offsets), np.int64), np.empty(max(offsets[-1] - offsets[0], 1), np.uint8)
    _fold_whitespace(offsets, data, folded_offsets, folded)
    buffers = [None, pa.py_buffer(folded_offsets), pa.py_buffer(folded[: folded_offsets[-1]])]
    result = pa.Array.from_buffers(pa.large_string(), len(texts), buffers)
    return pc.if_else(texts.is_valid(), result, pa.scalar(None, pa.large_string())) if texts.null_count else result


EMPTY = np.uint64(0)
LOW_32 = np.uint64(0xFFFFFFFF)


@numba.njit(nogil=True, cache=True)
def _setdefault(table, hashes, checks, values, found):
    mask = np.uint64(len(table) - 1)
    added = 0
    for i in range(len(hashes)):
        # The slot's second word: the check's high half, then the value + 1 (0: an empty slot).
        tagged = (checks[i] & ~LOW_32) | np.uint64(values[i] + 1)
        slot = np.int64(hashes[i] & mask)
        while table[slot, 1] != EMPTY and (table[slot, 0] != hashes[i] or (table[slot, 1] & ~LOW_32) != (tagged & ~LOW_32)):
            slot = np.int64((slot + 1) & mask)
        if table[slot, 1] == EMPTY:
            table[slot, 0], table[slot, 1] = hashes[i], tagged
            added += 1
        found[i] = np.int64(table[slot, 1] & LOW_32) - 1
    return added


class HashIndex:
    """A map from 96-bit keys (a 64-bit hash and half of another) to values from 0 to 2³² - 2.

    Open addressing with linear probing, kept at most half full; a slot is 16 bytes, so a probe
    touches one cache line. Two different texts share a key with probability ~n²/2⁹⁷ (10⁻¹⁷ for a
    million texts): a match is taken as equality.
    """

    def __init__(self, expected_keys: int | None = None):
        capacity = 1 << max(16, (2 * (expected_keys or 0)).bit_length())  # sized up front: growing rehashes every key
        self.table = np.zeros((capacity, 2), np.uint64)
        self.size = 0

    def setdefault(self, hashes: np.ndarray, checks: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Key by key, in order: the value stored for it (maybe earlier in this call), else its own value, now stored."""
        if 2 * (self.size + len(hashes)) > len(self.table):
            self.grow(2 * (self.size + len(hashes)))
        if len(values) and values.max() >= LOW_32:
            raise ValueError(f"a hash index holds values below {LOW_32}, not {values.max()}")
        found = np.empty(len(hashes), np.int64)
        self.size += _setdefault(self.table, hashes, checks, values.astype(np.int64), found)
        return found

    def grow(self, at_least: int) -> None:
        hashes, tagged = self.table[self.table[:, 1] != EMPTY].T
        self.__init__(at_least // 2)
        self.setdefault(hashes, tagged & ~LOW_32, (tagged & LOW_32).astype(np.int64) - 1)
