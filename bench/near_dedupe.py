"""Near-duplicate dedupe: rensa vs datasketch on the same documents, then our index at scale.

    python bench/near_dedupe.py                 # 100k docs for the library comparison, 1M for the index
    python bench/near_dedupe.py --compare 20000 --documents 200000

Prints wall times side by side and recall / precision against the planted near-duplicates
(Jaccard of 3-word shingles ≈ 0.85 to their source). Run with 2 cores (taskset -c 0,1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datagen import near_duplicate_documents  # noqa: E402
from tasks.config import DedupeConfig  # noqa: E402
from tasks.prepare.near_dedupe import NearDuplicateIndex  # noqa: E402


def score(canonical: np.ndarray, planted: np.ndarray) -> tuple[float, float]:
    """Recall: planted copies found pointing at their source. Precision: found duplicates that are planted."""
    found = canonical != np.arange(len(canonical))
    is_planted = planted >= 0
    recall = float((canonical[is_planted] == planted[is_planted]).mean())
    correct = found & is_planted & (canonical == np.where(is_planted, planted, -2))
    precision = float(correct.sum() / max(found.sum(), 1))
    return recall, precision


def rensa_lsh(texts: list[str], config: DedupeConfig) -> tuple[np.ndarray, float]:
    """rensa's own objects and LSH index (one query per document), as its README shows."""
    import rensa

    started = time.perf_counter()
    lsh = rensa.RMinHashLSH(config.threshold, config.num_perm, 16)  # bands must divide num_perm
    canonical = np.arange(len(texts))
    for i, text in enumerate(texts):
        words = text.split()
        minhash = rensa.RMinHash(config.num_perm, 42)
        minhash.update([" ".join(words[j : j + config.shingle_size]) for j in range(len(words) - config.shingle_size + 1)])
        candidates = [c for c in lsh.query(minhash) if c < i]
        if candidates:
            canonical[i] = canonical[min(candidates)]
        lsh.insert(i, minhash)
    return canonical, time.perf_counter() - started


def datasketch_lsh(texts: list[str], config: DedupeConfig) -> tuple[np.ndarray, float]:
    from datasketch import MinHash, MinHashLSH

    started = time.perf_counter()
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    canonical = np.arange(len(texts))
    for i, text in enumerate(texts):
        words = text.split()
        minhash = MinHash(num_perm=config.num_perm, seed=42)
        minhash.update_batch(
            [" ".join(words[j : j + config.shingle_size]).encode() for j in range(len(words) - config.shingle_size + 1)]
        )
        candidates = [c for c in lsh.query(minhash) if c < i]
        if candidates:
            canonical[i] = canonical[min(candidates)]
        lsh.insert(i, minhash)
    return canonical, time.perf_counter() - started


def signing_only(texts: list[str], config: DedupeConfig) -> tuple[float, float]:
    """Signing the same shingle strings in bulk: rensa (Rust) vs datasketch (numpy)."""
    import rensa
    from datasketch import MinHash

    k = config.shingle_size
    shingles = [[" ".join(w[j : j + k]).encode() for j in range(len(w) - k + 1)] for w in (t.split() for t in texts)]
    started = time.perf_counter()
    rensa.RMinHash.digest_matrix_from_token_byte_sets(shingles, config.num_perm, 42)
    rensa_seconds = time.perf_counter() - started
    started = time.perf_counter()
    MinHash.bulk(shingles, num_perm=config.num_perm, seed=42)
    return rensa_seconds, time.perf_counter() - started


def ours(texts: list[str], config: DedupeConfig, scratch: str) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    index = NearDuplicateIndex(config, scratch)
    for start in range(0, len(texts), 65_536):
        index.add(pa.array(texts[start : start + 65_536]))
    canonical = index.canonical()
    return canonical, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=int, default=100_000, help="documents for the rensa/datasketch comparison")
    parser.add_argument("--documents", type=int, default=1_000_000, help="documents for our index at scale")
    parser.add_argument("--scratch", default="/tmp/near-dup-bench.u32")
    args = parser.parse_args()
    config = DedupeConfig(near_duplicates=True)

    texts, planted = near_duplicate_documents(args.compare)
    print(f"library comparison on {len(texts):,} documents of 40 words ({(planted >= 0).sum():,} planted near-duplicates)")
    rensa_sign, datasketch_sign = signing_only(texts, config)
    print(
        f"  signing only      rensa {rensa_sign:7.2f} s   datasketch {datasketch_sign:7.2f} s   ratio {datasketch_sign / rensa_sign:6.1f}x"
    )
    for name, run in (("rensa LSH", rensa_lsh), ("datasketch LSH", datasketch_lsh)):
        canonical, seconds = run(texts, config)
        recall, precision = score(canonical, planted)
        print(f"  {name:<17} {seconds:7.2f} s   recall {recall:.4f}   precision {precision:.4f}")
    canonical, seconds = ours(texts, config, args.scratch)
    recall, precision = score(canonical, planted)
    print(f"  ours (rensa bulk) {seconds:7.2f} s   recall {recall:.4f}   precision {precision:.4f}")

    del texts
    started = time.perf_counter()
    texts, planted = near_duplicate_documents(args.documents)
    print(
        f"\nour index on {len(texts):,} documents ({(planted >= 0).sum():,} planted; generated in {time.perf_counter() - started:.1f} s)"
    )
    canonical, seconds = ours(texts, config, args.scratch)
    recall, precision = score(canonical, planted)
    print(
        f"  wall {seconds:.1f} s (target ≤ 60 s, ratio {seconds / 60:.2f})   recall {recall:.4f}   precision {precision:.4f} (targets ≥ 0.95)"
    )
    Path(args.scratch).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
