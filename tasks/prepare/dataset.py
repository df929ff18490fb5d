"""The dataset: its files checked against the spec, then read as a stream of located Arrow batches."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tasks.config import DatasetSpec, SpecError
from tasks.prepare.jsonl import iter_jsonl_batches
from tasks.prepare.parquet import ParquetSource, check_schema, iter_parquet_batches, open_parquet, physical_schema
from tasks.prepare.sources import SourceBatch, format_of, resolve_files


@dataclass(frozen=True)
class Dataset:
    spec: DatasetSpec  # with the format resolved
    files: list[str]
    parquet: list[ParquetSource]

    def row_count(self) -> int | None:
        """From the Parquet footers (already read for the schema check); None for JSON lines."""
        return sum(source.fragment.metadata.num_rows for source in self.parquet) if self.parquet else None


def check_dataset(spec: DatasetSpec) -> Dataset:
    """Resolve the files, settle the format and check every Parquet file's schema; nothing is read yet."""
    files = resolve_files(spec.source)
    spec = spec.model_copy(update={"format": format_of(spec, files)})
    if spec.format == "openai_batch" and spec.id_column not in (None, "custom_id"):
        raise SpecError(f"dataset {spec.name}: OpenAI batch input has its ids in custom_id; leave id_column unset")
    if spec.format != "openai_batch" and not (spec.prompt_column or spec.prompt_template or spec.messages_column):
        raise SpecError(
            f"dataset {spec.name}: {files[0]} is {spec.format}, not OpenAI batch input: "
            "set one of prompt_column, prompt_template or messages_column"
        )
    if spec.format != "parquet":
        return Dataset(spec, files, [])
    sources = open_parquet(spec, files)
    for source in sources:
        check_schema(spec, source.file, physical_schema(source))
    return Dataset(spec, files, sources)


def iter_batches(dataset: Dataset, batch_size: int = 65_536) -> Iterator[SourceBatch]:
    if dataset.spec.format == "parquet":
        yield from iter_parquet_batches(dataset.spec, dataset.parquet, batch_size)
    else:
        yield from iter_jsonl_batches(dataset.spec, dataset.files, dataset.spec.format, batch_size)


def prefetch(batches: Iterator[SourceBatch], depth: int = 2) -> Iterator[SourceBatch]:
    """Read ahead in a thread: Arrow decodes without the GIL, so reading overlaps the Python work on the previous batch."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                ready.put(batch)
        except BaseException as error:  # handed to the consumer, raised there
            ready.put(error)
        ready.put(done)

    threading.Thread(target=produce, daemon=True, name="prefetch-batches").start()
    while (item := ready.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
