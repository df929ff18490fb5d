"""The GPU guard: a global concurrency limit taken inside the shard task, after the cache lookup."""

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency

from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, SamplingConfig, ShardingConfig, StoreConfig

pytestmark = pytest.mark.slow


def test_a_held_gpu_stalls_new_work_but_not_cached_shards_and_a_missing_limit_blocks_nothing(
    prefect_harness, tiny_model, tmp_path, sample_parquet
):
    data = tmp_path / "twenty.parquet"
    pq.write_table(pq.read_table(sample_parquet).slice(0, 20), data)
    dataset = DatasetSpec(name="twenty", source=str(data), id_column="id", prompt_column="prompt")
    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "s"))
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="one-gpu", limit=1))

    def run(limit: str, sampling: SamplingConfig):
        sharding = ShardingConfig(shard_size=8, gpu_limit=limit)
        return batch_inference(dataset=dataset, model=tiny_model, sampling=sampling, sharding=sharding, store=store)

    first = run("no-such-limit", SamplingConfig(max_tokens=4))  # not created: the guard is skipped
    assert first.cached_shards == 0 and first.engine_requests == first.unique_requests

    results = {}
    with concurrency("one-gpu", occupy=1):  # someone else holds the only GPU
        cached = run("one-gpu", SamplingConfig(max_tokens=4))
        assert cached.cached_shards == cached.shards  # cached shards did not wait for it
        waiting = threading.Thread(target=lambda: results.update(new=run("one-gpu", SamplingConfig(max_tokens=5))))
        waiting.start()
        time.sleep(15)
        assert waiting.is_alive()  # new work waits for the GPU: no output beyond the first run's
        assert len(list(Path(store.storage, "outputs").glob("*.parquet"))) == first.shards
    waiting.join(timeout=600)
    assert results["new"].cached_shards == 0 and results["new"].engine_requests == first.engine_requests
