"""batch_inference with its storage on an object store (a real S3-compatible server on 127.0.0.1):
shard files, manifests and cache records live in the bucket, only the DuckDB file is local."""

from pathlib import Path

import fsspec
import pytest

from flows.batch_inference import batch_inference
from tasks.config import SamplingConfig, ShardingConfig, StoreConfig
from tasks.engines import vllm as engine_module

pytestmark = pytest.mark.slow


def run(dataset, model, store):
    return batch_inference(
        dataset=dataset, model=model, sampling=SamplingConfig(max_tokens=8), sharding=ShardingConfig(shard_size=64), store=store
    )


def test_a_run_on_s3_storage_commits_every_output_and_a_new_results_file_takes_every_shard_from_the_bucket(
    prefect_harness, tiny_model, sample_spec, tmp_path, s3_bucket, query, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would make a folder here
    dataset = sample_spec(200)
    local_before = {p.name for p in tmp_path.iterdir()}
    store = StoreConfig(duckdb_path=str(tmp_path / "results.duckdb"), storage=f"{s3_bucket}/runs/storage")

    first = run(dataset, tiny_model, store)

    assert first.shards > 1 and first.cached_shards == 0 and first.errors == 0
    assert first.engine_requests == first.unique_requests == first.outputs > 0
    assert query(store, "SELECT count(*), count(DISTINCT request_key), count(text) FROM outputs") == [(first.outputs,) * 3]
    assert query(store, "SELECT count(*) FROM requests") == [(first.requests,)]
    assert query(store, "SELECT count(*) FROM scores WHERE scorer = 'completion_chars'") == [(first.outputs,)]
    assert query(store, "SELECT status, outputs FROM runs") == [("completed", first.outputs)]
    keys = fsspec.filesystem("s3", skip_instance_cache=True).find(f"{s3_bucket}/runs/storage")
    prefix = f"{s3_bucket[5:]}/runs/storage"
    assert sum(k.startswith(f"{prefix}/outputs/") and k.endswith(".json") for k in keys) == first.shards  # the manifests
    assert sum(k.startswith(f"{prefix}/shards/") for k in keys) == first.shards
    assert any(k.startswith(f"{prefix}/prepared/") for k in keys) and any(k.startswith(f"{prefix}/scores/") for k in keys)

    # Another results file on the same bucket: every shard is a cache hit read from the manifests there.
    sent = engine_module.get_engine(tiny_model).requests_sent
    elsewhere = store.model_copy(update={"duckdb_path": str(tmp_path / "other.duckdb")})
    second = run(dataset, tiny_model, elsewhere)
    assert second.cached_shards == second.shards == first.shards and second.engine_requests == 0
    assert engine_module.get_engine(tiny_model).requests_sent == sent
    sql = "SELECT request_key, sample_index, text, finish_reason FROM outputs ORDER BY 1, 2"
    assert query(elsewhere, sql) == query(store, sql)

    # Nothing but the two results files was written locally.
    written = {p.name for p in tmp_path.iterdir()} - local_before
    assert written <= {"results.duckdb", "results.duckdb.wal", "other.duckdb", "other.duckdb.wal"}, written
    assert not Path(tmp_path, "s3:").exists()
