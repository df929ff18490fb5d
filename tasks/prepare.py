"""Prepare: stream the dataset through load → render → dedupe → shard, writing Parquet parts.

The tasks here return small manifests (paths, keys, counts); the rows stay in files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pyarrow as pa
import numpy as np
import pyarrow.compute as pc
from prefect import task
from pydantic import BaseModel

from tasks import files
from tasks.config import DatasetSpec, ShardingConfig, SpecError, StoreConfig
from tasks.dedupe import ExactDeduper, NearDuplicateIndex
from tasks.load import check_dataset, iter_batches
from tasks.render import Mode, Renderer, content_hash, template_hash
from tasks.shard import SHARD_COLUMNS, Shard, cut_shards, shard_key
from tasks.validate import Validator


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

    @property
    def duplicates(self) -> int:
        return self.requests - self.unique_requests


class DatasetVersioner:
    """Content hash of a dataset as the pipeline sees it: every request and every rejected row."""

    def __init__(self, settings: object = None) -> None:
        self.digest = hashlib.blake2b(digest_size=16)
        self.digest.update(content_hash(settings).encode())  # what decides duplicates and rejections

    def add(self, requests: pa.Table, rejected: pa.Table) -> None:
        for table, columns in ((requests, ["custom_id", "request_key"]), (rejected, ["source_row", "reason"])):
            for row in zip(*(table[c].to_pylist() for c in columns)):
                self.digest.update("\t".join(map(str, row)).encode() + b"\n")

    def version(self) -> str:
        return self.digest.hexdigest()


@task(name="write-requests")
def write_requests(dataset: DatasetSpec, mode: Mode, work_dir: str, context_tokens: int | None = None) -> RequestSet:
    """Load, render, validate and dedupe the dataset into request and rejected-row Parquet parts."""
    source = check_dataset(dataset)
    renderer = Renderer(source.spec, mode)
    validator = Validator(dataset.validation, context_tokens)
    deduper = ExactDeduper(id_field=renderer.id_field, config=dataset.dedupe)
    versioner = DatasetVersioner(
        {"dedupe": dataset.dedupe.model_dump(), "validation": validator.expectations, "reference": dataset.reference_column}
    )
    request_files: list[str] = []
    rejected_files: list[str] = []
    rows_read = requests = rejected_count = 0
    for part, batch in enumerate(iter_batches(source)):
        rendered, rejected = renderer.render(batch)
        valid, failed = validator.validate(rendered)
        marked, duplicate_ids = deduper.mark(valid)
        marked = marked.drop_columns(["approx_tokens", "roles"])
        rejected = pa.concat_tables([rejected, failed, duplicate_ids])
        versioner.add(marked, rejected)
        rows_read += batch.rows_read
        requests += marked.num_rows
        rejected_count += rejected.num_rows
        request_files.append(files.join(work_dir, "requests", f"part-{part:05d}.parquet"))
        files.write_parquet(marked, request_files[-1])
        if rejected.num_rows:
            rejected_files.append(files.join(work_dir, "rejected", f"part-{part:05d}.parquet"))
            files.write_parquet(rejected, rejected_files[-1])
    if rows_read == 0:
        raise SpecError(f"dataset {dataset.name}: {dataset.source} has no rows")
    if dataset.dedupe.near_duplicates:
        mark_near_duplicates(request_files, dataset, work_dir)
    return RequestSet(
        dataset_version=versioner.version(),
        template_hash=template_hash(source.spec, mode),
        request_files=request_files,
        rejected_files=rejected_files,
        rows_read=rows_read,
        requests=requests,
        unique_requests=sum(files.read_parquet(f, ["duplicate_of"])["duplicate_of"].null_count for f in request_files),
        rejected=rejected_count,
        validation=validator.report(),
    )


def mark_near_duplicates(request_files: list[str], dataset: DatasetSpec, work_dir: str) -> None:
    """Second pass: canonical requests that are near-duplicates of an earlier one point at it.

    Exact duplicates already point at their canonical request; when that one turns out to be a
    near-duplicate, they are re-pointed at its canonical so every pointer reaches a computed request.
    """
    scratch = Path(work_dir, "near-duplicates.u32") if "://" not in work_dir else None
    if scratch:
        scratch.parent.mkdir(parents=True, exist_ok=True)
    index = NearDuplicateIndex(dataset.dedupe, str(scratch) if scratch else None)
    canonical_ids = []
    for path in request_files:
        table = files.read_parquet(path, ["custom_id", "dedupe_text", "duplicate_of"])
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
        table = files.read_parquet(path)
        pointers = [
            root_of.get(custom_id) if duplicate_of is None else root_of.get(duplicate_of, duplicate_of)
            for custom_id, duplicate_of in zip(table["custom_id"].to_pylist(), table["duplicate_of"].to_pylist())
        ]
        table = table.set_column(table.schema.get_field_index("duplicate_of"), "duplicate_of", pa.array(pointers, pa.string()))
        files.write_parquet(table, path)


class ShardPlan(BaseModel):
    shards: list[Shard]
    reused_requests: int  # unique requests answered by outputs already in DuckDB (not sent again)


def unique_requests_sql(results: str | None, group_prefixes: bool) -> str:
    """The query for the unique requests still to compute, in shard order."""
    skip = (
        "AND request_key NOT IN (SELECT request_key FROM results.outputs "
        "WHERE model_fingerprint = $fp AND sampling_hash = $sh)"
        if results
        else ""
    )
    # Sorting by the text puts prompts that share a prefix (system prompt, template head) side by side.
    order = "ORDER BY dedupe_text, request_key" if group_prefixes else ""
    columns = ", ".join([*SHARD_COLUMNS, "approx_tokens"])
    return (
        f"SELECT {columns} FROM (SELECT *, ceil(length(dedupe_text) / 4)::BIGINT AS approx_tokens "
        f"FROM read_parquet($files) WHERE duplicate_of IS NULL {skip}) {order}"
    )


def results_with_outputs(duckdb_path: str | None) -> str | None:
    """The results file when it has an outputs table; None for a first run."""
    if not duckdb_path or not Path(duckdb_path).is_file():
        return None
    with duckdb.connect(duckdb_path, read_only=True) as con:
        found = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'outputs'").fetchone()[0]
    return duckdb_path if found else None


@task(name="write-shards")
def write_shards(
    request_set: RequestSet, sharding: ShardingConfig, store: StoreConfig, model_fingerprint: str, sampling_hash: str
) -> ShardPlan:
    """Cut the unique requests not yet answered into shard files named by their content.

    Requests with outputs for this model and sampling in the results file are left out (an
    incremental re-run computes only new requests); the file is read read-only.
    """
    if not request_set.request_files:
        return ShardPlan(shards=[], reused_requests=0)
    results = results_with_outputs(store.duckdb_path)
    con = duckdb.connect()
    try:
        con.execute("SET threads = 2; SET memory_limit = '512MB'; SET preserve_insertion_order = true")
        if results:
            con.execute(f"ATTACH '{results}' AS results (READ_ONLY)")
        params = {"files": request_set.request_files}
        if results:
            params |= {"fp": model_fingerprint, "sh": sampling_hash}
        reader = con.sql(unique_requests_sql(results, sharding.group_prefixes), params=params).to_arrow_reader(65_536)
        shards = []
        pending = 0
        for table in cut_shards((pa.Table.from_batches([b]) for b in reader), sharding.shard_size, sharding.max_shard_tokens):
            key = shard_key(table["request_key"].to_pylist())
            path = files.join(store.storage, "shards", f"{key}.parquet")
            if not files.exists(path):
                files.write_parquet(table, path)
            shards.append(Shard(shard_key=key, path=path, requests=table.num_rows))
            pending += table.num_rows
    finally:
        con.close()
    return ShardPlan(shards=shards, reused_requests=request_set.unique_requests - pending)


def rejected_share_error(request_set: RequestSet, dataset: DatasetSpec) -> str | None:
    share = request_set.rejected / request_set.rows_read if request_set.rows_read else 0.0
    if share <= dataset.validation.max_rejected_share:
        return None
    return (
        f"dataset {dataset.name}: {request_set.rejected} of {request_set.rows_read} rows rejected ({share:.1%}), "
        f"more than validation.max_rejected_share = {dataset.validation.max_rejected_share:.1%}; "
        "see the dataset-validation artifact for the failing expectations. Nothing was written to DuckDB."
    )


@task(name="check-rejected-share")
def check_rejected_share(request_set: RequestSet, dataset: DatasetSpec) -> None:
    """Fail the run, before anything is stored, when too much of the dataset is rejected."""
    if error := rejected_share_error(request_set, dataset):
        raise SpecError(error)
