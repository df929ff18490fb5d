"""Shard cache records live on the result storage, which workers share: a record is plain data, and
one that does not check out is a miss, never code to run nor a commit that fails."""

import json
from pathlib import Path

import pytest
from prefect.serializers import PickleSerializer

from flows.batch_inference import batch_inference
from tasks.config import SamplingConfig, ShardingConfig, StoreConfig

pytestmark = pytest.mark.slow

SAMPLING, SHARDING = SamplingConfig(max_tokens=4), ShardingConfig(shard_size=8)


class LeavesAMark:
    """Unpickling this creates the marker file: what a planted pickle could do with any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def fresh_results_file(store: StoreConfig, name: str) -> StoreConfig:
    """The same result storage (so its cache) with a results file that holds no answers yet."""
    return store.model_copy(update={"duckdb_path": str(Path(store.duckdb_path).with_name(f"{name}.duckdb"))})


def plant_records(storage: Path, stem: str, marker: Path) -> None:
    """Where Prefect's cache looked for a shard (a pickle), and where ours looks (a manifest that lies)."""
    pickled = PickleSerializer().dumps(LeavesAMark(marker)).decode()
    record = {"metadata": {"storage_key": stem, "serializer": {"type": "pickle"}, "expiration": None}, "result": pickled}
    (storage / "prefect-results").mkdir(exist_ok=True)
    (storage / "prefect-results" / stem).write_text(json.dumps(record))
    manifest = storage / "outputs" / f"{stem}.json"
    fake = {"__class__": "builtins.open", "data": str(marker)}
    if manifest.exists():  # keep its keys, point it at a file of the attacker's
        fake = {**json.loads(manifest.read_text()), "path": str(storage / "elsewhere.parquet")}
    manifest.write_text(json.dumps(fake))


def test_a_planted_cache_record_runs_no_code_and_is_a_miss(prefect_harness, tiny_model, sample_spec, store, tmp_path, query):
    spec = sample_spec(24)
    first = batch_inference(dataset=spec, model=tiny_model, sampling=SAMPLING, sharding=SHARDING, store=store)
    storage, marker = Path(store.storage), tmp_path / "marker"
    stems = [path.stem for path in (storage / "outputs").glob("*.parquet")]
    assert len(stems) == first.shards > 1
    for stem in stems:
        plant_records(storage, stem, marker)

    again = fresh_results_file(store, "again")
    second = batch_inference(dataset=spec, model=tiny_model, sampling=SAMPLING, sharding=SHARDING, store=again)

    assert not marker.exists()  # no planted record was unpickled or decoded into a call
    assert second.cached_shards == 0 and second.engine_requests == first.engine_requests  # every shard computed again
    assert query(again, "SELECT count(*) FROM outputs") == query(store, "SELECT count(*) FROM outputs")
    third = batch_inference(
        dataset=spec, model=tiny_model, sampling=SAMPLING, sharding=SHARDING, store=fresh_results_file(store, "third")
    )
    assert third.cached_shards == first.shards  # the records the second run rewrote are good ones


def test_a_cached_shard_whose_output_file_is_gone_is_computed_again(prefect_harness, tiny_model, sample_spec, store, query):
    spec = sample_spec(24)
    first = batch_inference(dataset=spec, model=tiny_model, sampling=SAMPLING, sharding=SHARDING, store=store)
    deleted = sorted((Path(store.storage) / "outputs").glob("*.parquet"))[0]
    deleted.unlink()

    again = fresh_results_file(store, "again")
    second = batch_inference(dataset=spec, model=tiny_model, sampling=SAMPLING, sharding=SHARDING, store=again)

    assert deleted.exists()
    assert second.cached_shards == first.shards - 1
    assert query(again, "SELECT count(*) FROM outputs") == query(store, "SELECT count(*) FROM outputs")
    assert query(again, "SELECT cached FROM run_shards WHERE output_key = ?", [deleted.stem]) == [(False,)]
