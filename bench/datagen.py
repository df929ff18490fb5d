"""Generated datasets for the input-side benchmarks (deterministic: seeded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VOCABULARY = np.array([f"w{i:05d}" for i in range(50_000)])


def prompts_parquet(path: Path, rows: int, duplicate_share: float = 0.1, seed: int = 0, lines: int = 1) -> Path:
    """`rows` prompts of ~30 words in `lines` lines, a share of them repeated with different case and spacing."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        words = VOCABULARY[rng.integers(0, len(VOCABULARY), size=(n, 30))]
        texts = ["\n".join(" ".join(line) for line in np.array_split(row, lines)) for row in words]
        for i in np.flatnonzero(rng.random(n) < duplicate_share):
            source = texts[rng.integers(0, max(i, 1))]
            texts[i] = "  " + source.upper() if rng.random() < 0.5 else source.replace(" ", "\n", 3)
        batches.append(pa.table({"id": [f"r{start + i}" for i in range(n)], "prompt": texts}))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(batches), path, row_group_size=100_000)
    return path


def near_duplicate_documents(documents: int, words: int = 40, planted_share: float = 0.1, seed: int = 0):
    """(texts, planted) where planted[i] = index of the document i was made from (or -1).

    A planted near-duplicate replaces one word of its source, which keeps the Jaccard similarity
    of 3-word shingles at (words - 5) / (words + 1) ≈ 0.85 ≥ 0.8.
    """
    rng = np.random.default_rng(seed)
    tokens = VOCABULARY[rng.integers(0, len(VOCABULARY), size=(documents, words))]
    planted = np.full(documents, -1)
    is_copy = rng.random(documents) < planted_share
    is_copy[0] = False
    originals, chosen = np.flatnonzero(~is_copy), np.flatnonzero(is_copy)
    below = np.searchsorted(originals, chosen)  # originals earlier than each copy (at least document 0)
    sources = originals[(rng.random(len(chosen)) * below).astype(int)]
    tokens[chosen] = tokens[sources]
    tokens[chosen, rng.integers(0, words, len(chosen))] = "zzzzz"
    planted[chosen] = sources
    return [" ".join(row) for row in tokens], planted
