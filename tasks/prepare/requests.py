"""Requests: stream a dataset through load → render → validate → dedupe into Parquet parts, then cut
the unique requests still without an answer into content-addressed shards.

What comes back are small manifests (paths, keys, counts); the rows stay in files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from tasks import storage
from tasks.config import DatasetSpec, Mode, ShardingConfig, SpecError
from tasks.keys import DatasetVersioner, input_fingerprint, shard_key, template_hash
from tasks.prepare.dataset import check_dataset, iter_batches, prefetch
from tasks.prepare.dedupe import ExactDeduper
from tasks.prepare.near_dedupe import NearDuplicateIndex
from tasks.prepare.render import Renderer
from tasks.prepare.shard import PREFIX_BUCKET_ROWS, SHARD_COLUMNS, Shard, cut_shards, order_by_prefix
from tasks.prepare.validate import Validator


class RequestSet(BaseModel):
    dataset_version: str
    template_hash: str
    request_files: list[str]
    rejected_files: list[str]
    rows_read: int
    requests: int
    unique_requests: int
    rejected: int
    validation: list[dict] = []  # one row per expectation: the validation result
    input_fingerprint: str = ""  # the input as prepared: see input_fingerprint()

    @property
    def duplicates(self) -> int:
        return self.requests - self.unique_requests


# Rows per batch: Python objects exist for one batch at a time, so this bounds the working memory.
BATCH_ROWS = 32_768


def read_request_set(manifest: str) -> RequestSet | None:
    """A request set prepared earlier, if its manifest and every part it names are still there."""
    if not storage.exists(manifest):
        return None
    request_set = RequestSet.model_validate_json(storage.read_text(manifest))
    parts = [*request_set.request_files, *request_set.rejected_files]
    return request_set if all(storage.exists(part) for part in parts) else None


def prepare_requests(dataset: DatasetSpec, mode: Mode, storage_root: str, context_tokens: int | None) -> RequestSet:
    """Load, render, validate and dedupe the dataset into request and rejected-row Parquet parts.

    The parts are kept under storage/prepared/<input fingerprint>, so an input that has not
    changed (same spec, same files) is not read again: a re-run starts from its parts.
    """
    fingerprint = input_fingerprint(dataset, mode, context_tokens)
    folder = storage.join(storage_root, "prepared", fingerprint)
    manifest = storage.join(folder, "request-set.json")
    if (prepared := read_request_set(manifest)) is not None:
        return prepared
    source = check_dataset(dataset)
    renderer = Renderer(source.spec, mode)
    validator = Validator(dataset.validation, context_tokens)
    deduper = ExactDeduper(id_field=renderer.id_field, config=dataset.dedupe, expected_rows=source.row_count())
    versioner = DatasetVersioner(
        {
            "dedupe": dataset.dedupe.model_dump(exclude={"fan_out"}),
            "validation": validator.expectations,
            "reference": dataset.reference_column,
        }
    )
    request_files: list[str] = []
    rejected_files: list[str] = []
    rows_read = requests = rejected_count = 0
    for part, batch in enumerate(prefetch(iter_batches(source, batch_size=BATCH_ROWS))):
        rendered, rejected = renderer.render(batch)
        valid, failed = validator.validate(rendered)
        marked, duplicate_ids = deduper.mark(valid)
        marked = marked.drop_columns(["approx_tokens", "roles", *renderer.source_columns])
        rejected = pa.concat_tables([rejected, failed, duplicate_ids])
        versioner.add(marked, rejected)
        rows_read += batch.rows_read
        requests += marked.num_rows
        rejected_count += rejected.num_rows
        request_files.append(storage.join(folder, "requests", f"part-{part:05d}.parquet"))
        storage.write_parquet(marked, request_files[-1])
        if rejected.num_rows:
            rejected_files.append(storage.join(folder, "rejected", f"part-{part:05d}.parquet"))
            storage.write_parquet(rejected, rejected_files[-1])
    if rows_read == 0:
        raise SpecError(f"dataset {dataset.name}: {dataset.source} has no rows")
    if dataset.dedupe.near_duplicates:
        mark_near_duplicates(request_files, dataset)
    request_set = RequestSet(
        dataset_version=versioner.version(),
        template_hash=template_hash(source.spec, mode),
        request_files=request_files,
        rejected_files=rejected_files,
        rows_read=rows_read,
        requests=requests,
        unique_requests=sum(storage.read_parquet(f, ["duplicate_of"])["duplicate_of"].null_count for f in request_files),
        rejected=rejected_count,
        validation=validator.report(),
        input_fingerprint=fingerprint,
    )
    storage.write_text(request_set.model_dump_json(), manifest)  # last: the parts are complete
    return request_set


def mark_near_duplicates(request_files: list[str], dataset: DatasetSpec) -> None:
    """Second pass: canonical requests that are near-duplicates of an earlier one point at it.

    Exact duplicates already point at their canonical request; when that one turns out to be a
    near-duplicate, they are re-pointed at its canonical so every pointer reaches a computed request.
    """
    with tempfile.TemporaryDirectory(prefix="near-duplicates-") as scratch:
        index = NearDuplicateIndex(dataset.dedupe, str(Path(scratch, "signatures.u32")))
        canonical_ids = []
        for path in request_files:
            table = storage.read_parquet(path, ["custom_id", "dedupe_text", "duplicate_of"])
            canonical = table.filter(pc.is_null(table["duplicate_of"]))
            index.add(canonical["dedupe_text"].combine_chunks())
            canonical_ids.append(canonical["custom_id"].combine_chunks())
        roots = index.canonical()
    ids = pa.chunked_array(canonical_ids, pa.string()).combine_chunks()
    moved = roots != np.arange(len(roots))
    root_of = dict(zip(ids.filter(pa.array(moved)).to_pylist(), ids.take(pa.array(roots[moved])).to_pylist()))
    if not root_of:
        return
    for path in request_files:
        table = storage.read_parquet(path)
        pointers = [
            root_of.get(custom_id) if duplicate_of is None else root_of.get(duplicate_of, duplicate_of)
            for custom_id, duplicate_of in zip(table["custom_id"].to_pylist(), table["duplicate_of"].to_pylist())
        ]
        table = table.set_column(table.schema.get_field_index("duplicate_of"), "duplicate_of", pa.array(pointers, pa.string()))
        storage.write_parquet(table, path)


class ShardPlan(BaseModel):
    shards: list[Shard]
    reused_requests: int  # unique requests answered by outputs already in DuckDB (not sent again)


def pending_requests(request_set: RequestSet, answered: pa.Array | None, only: pa.Array | None = None) -> Iterator[pa.Table]:
    """The canonical requests still without an output (of those in `only`, when given), with their approximate tokens."""
    for path in request_set.request_files:
        table = storage.read_parquet(path, [*SHARD_COLUMNS, "dedupe_text", "duplicate_of"])
        keep = pc.is_null(table["duplicate_of"])
        if answered is not None:
            keep = pc.and_(keep, pc.invert(pc.is_in(table["request_key"], value_set=answered)))
        if only is not None:
            keep = pc.and_(keep, pc.is_in(table["request_key"], value_set=only))
        table = table.filter(keep).drop_columns(["duplicate_of"])
        tokens = pc.ceil(pc.divide(pc.utf8_length(table["dedupe_text"]).cast(pa.float64()), 4)).cast(pa.int64())
        yield table.append_column("approx_tokens", tokens)


def plan_shards(
    request_set: RequestSet,
    sharding: ShardingConfig,
    storage_root: str,
    answered: pa.Array | None,
    work_dir: str,
    only: pa.Array | None = None,
) -> ShardPlan:
    """Cut the unique requests not yet answered into shard files named by their content.

    `answered` holds the request keys that already have outputs for this model and sampling: an
    incremental re-run computes only the new requests. `only` (a rerun's) keeps just these keys.
    """
    pending = pending_requests(request_set, answered, only)
    if sharding.group_prefixes:
        buckets = 1 + request_set.unique_requests // PREFIX_BUCKET_ROWS
        pending = order_by_prefix(pending, storage.join(work_dir, "prefix-buckets"), buckets)
    shards = []
    for table in cut_shards(pending, sharding.shard_size, sharding.max_shard_tokens):
        key = shard_key(table["request_key"].to_pylist())
        path = storage.join(storage_root, "shards", f"{key}.parquet")
        if not storage.exists(path):
            storage.write_parquet(table, path)
        shards.append(Shard(shard_key=key, path=path, requests=table.num_rows))
    return ShardPlan(shards=shards, reused_requests=request_set.unique_requests - sum(s.requests for s in shards))


def rejected_share_error(request_set: RequestSet, dataset: DatasetSpec) -> str | None:
    share = request_set.rejected / request_set.rows_read if request_set.rows_read else 0.0
    if share <= dataset.validation.max_rejected_share:
        return None
    return (
        f"dataset {dataset.name}: {request_set.rejected} of {request_set.rows_read} rows rejected ({share:.1%}), "
        f"more than validation.max_rejected_share = {dataset.validation.max_rejected_share:.1%}; "
        "see the dataset-validation artifact for the failing expectations. Nothing was written to DuckDB."
    )
