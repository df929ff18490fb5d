"""OpenAI batch output and error files, written from an export selection (and a batch run's gaps).

No Prefect here: `vbf export`, `vbf run-batch` and the Batch API server all write them.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Iterable, Iterator

import pyarrow.parquet as pq
from pydantic import BaseModel

from tasks import storage
from tasks.config import StoreConfig
from tasks.export.formats import batch_line, error_line, group_samples, to_json_line
from tasks.store.exports import write_batch_selection

UNANSWERED = ("batch_not_answered", "the run ended before this request was answered")


class BatchFiles(BaseModel):
    """What a batch's output and error files hold: their lines, and the tokens of the answered ones."""

    output_lines: int = 0
    error_lines: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def selection_rows(selection: str) -> Iterator[dict]:
    """Rows in bounded batches: an export of millions of outputs never sits in memory at once."""
    for batch in pq.ParquetFile(selection).iter_batches(batch_size=10_000):
        yield from batch.to_pylist()


def write_batch_files(
    selection: str | None,
    output_path: str,
    error_path: str | None,
    gaps: str | None = None,
    run_id: str = "",
    unanswered: tuple[str, str] = UNANSWERED,
    extra_errors: Iterable[tuple[str, str, str]] = (),
    model_name: str | None = None,
) -> BatchFiles:
    """Every row of the selection (duplicates too, as in an OpenAI batch) to the output file or the
    error file; then each gap (a rejected line, or one the run never answered: `unanswered` is its
    code and message) and each extra error (custom_id, code, message) to the error file — or, without
    one, to the output file too (as `vllm run-batch` writes them). `model_name` is the name answers
    carry (a server's name for its model; unset: the run's model). Both files appear whole, or not at all."""
    counts = BatchFiles()
    with contextlib.ExitStack() as files:
        output = files.enter_context(storage.atomic_writer(output_path, "w"))
        errors = files.enter_context(storage.atomic_writer(error_path, "w")) if error_path else output
        for samples in group_samples(selection_rows(selection)) if selection else ():
            line = batch_line([{**s, "model": model_name or s["model"]} for s in samples])
            if line.error is not None:
                errors.write(to_json_line(line))
                counts.error_lines += 1
                continue
            output.write(to_json_line(line))
            counts.output_lines += 1
            counts.prompt_tokens += line.response.body.usage.prompt_tokens
            counts.completion_tokens += line.response.body.usage.completion_tokens
        gap_errors = (
            (gap["custom_id"], *((gap["code"], gap["message"]) if gap["code"] else unanswered))
            for gap in (selection_rows(gaps) if gaps else ())
        )
        for custom_id, code, message in itertools.chain(gap_errors, extra_errors):
            errors.write(to_json_line(error_line(run_id, custom_id, code, message)))
            counts.error_lines += 1
    return counts


def write_batch_result(
    store: StoreConfig | None,
    run_id: str | None,
    output_path: str,
    error_path: str | None,
    unanswered: tuple[str, str] = UNANSWERED,
    extra_errors: Iterable[tuple[str, str, str]] = (),
    model_name: str | None = None,
) -> BatchFiles:
    """A batch run's output and error files: one line per input line, from what the run committed
    (no store and run: only the extra errors, for a batch whose run never started)."""
    if store is None or run_id is None:
        return write_batch_files(None, output_path, error_path, extra_errors=extra_errors)
    with tempfile.TemporaryDirectory(prefix="vbf-batch-") as work:
        selection, gaps = f"{work}/selection.parquet", f"{work}/gaps.parquet"
        write_batch_selection(store.duckdb_path, store.lock_timeout_seconds, run_id, selection, gaps)
        return write_batch_files(selection, output_path, error_path, gaps, run_id, unanswered, extra_errors, model_name)
