"""Exact dedupe with normalization vs pandas without it, on the same 1M-row Parquet file.

    python bench/exact_dedupe.py [--rows 1000000] [--lines 3]

Ours (match: normalized): stream the file with the pipeline's reader (read ahead in a thread, batches of BATCH_ROWS), normalize (NFKC, whitespace folded), hash, mark the
first of each content canonical and the others duplicate_of it, and reject repeated ids.
Pandas: `pd.read_parquet` + `drop_duplicates` on the raw text. Runs the two in turn --rounds times
and prints the medians (and minimums) and their ratio (target ≤ 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.datagen import prompts_parquet  # noqa: E402
from tasks.config import DatasetSpec, DedupeConfig  # noqa: E402
from tasks.prepare.dataset import check_dataset, iter_batches, prefetch  # noqa: E402
from tasks.prepare.dedupe import ExactDeduper  # noqa: E402
from tasks.prepare.requests import BATCH_ROWS  # noqa: E402


def ours(path: Path) -> int:
    source = check_dataset(DatasetSpec(name="bench", source=str(path), id_column="id", prompt_column="prompt"))
    # match: normalized, the costlier path (the default, exact, hashes each request's 32-character key instead)
    config = DedupeConfig(match="normalized")
    deduper = ExactDeduper(id_field="id", config=config, expected_rows=source.row_count())
    duplicates = 0
    for part in prefetch(iter_batches(source, batch_size=BATCH_ROWS)):
        batch = part.batch
        table = pa.table({"custom_id": batch["id"], "dedupe_text": batch["prompt"]})
        marked, _ = deduper.mark(table)
        duplicates += marked.num_rows - marked["duplicate_of"].null_count
    return duplicates


def with_pandas(path: Path) -> int:
    frame = pd.read_parquet(path)
    return len(frame) - len(frame.drop_duplicates(subset=["prompt"]))


def alternating(rounds: int, path: Path) -> dict[str, list[float]]:
    """Both sides in turn, so a noisy spell on the machine hits both alike."""
    times: dict[str, list[float]] = {"pandas": [], "ours": []}
    for _ in range(rounds):
        for name, function in (("pandas", with_pandas), ("ours", ours)):
            started = time.perf_counter()
            function(path)
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--lines", type=int, default=1, help="lines per prompt: with 2 or more every row needs folding")
    parser.add_argument("--data", default=str(ROOT / ".cache" / "bench"))
    args = parser.parse_args()
    name = f"prompts-{args.rows}.parquet" if args.lines == 1 else f"prompts-{args.rows}-{args.lines}-lines.parquet"
    path = prompts_parquet(Path(args.data) / name, args.rows, lines=args.lines)

    pandas_duplicates, our_duplicates = with_pandas(path), ours(path)  # also warms both up
    times = alternating(args.rounds, path)
    pandas_median, our_median = statistics.median(times["pandas"]), statistics.median(times["ours"])
    print(f"{args.rows:,} rows from {path.name}, {args.rounds} alternating rounds: median (min)")
    print(
        f"  pandas read_parquet + drop_duplicates (raw text)   {pandas_median:6.2f} s ({min(times['pandas']):.2f})   {pandas_duplicates:,} duplicates"
    )
    print(
        f"  ours, normalized (NFKC, whitespace, ids checked)   {our_median:6.2f} s ({min(times['ours']):.2f})   {our_duplicates:,} duplicates"
    )
    print(
        f"  ratio ours / pandas, medians = {our_median / pandas_median:.2f} (target ≤ 1.0); of the minimums {min(times['ours']) / min(times['pandas']):.2f}"
    )


if __name__ == "__main__":
    main()
