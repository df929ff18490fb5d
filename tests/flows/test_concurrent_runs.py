"""Two flows, in two processes, committing to one DuckDB file at the same time."""

import duckdb
import pyarrow.parquet as pq
import pytest

from tasks.config import DatasetSpec, SamplingConfig, ShardingConfig, StoreConfig

pytestmark = pytest.mark.slow


def test_two_flows_committing_to_one_file_both_land_with_nothing_lost_or_duplicated(
    tiny_model, tmp_path, start_flow_process, sample_parquet
):
    sample = pq.read_table(sample_parquet)
    specs = []
    for name, start in (("first", 0), ("second", 100)):  # overlapping rows: shared requests, shared outputs
        path = tmp_path / f"{name}.parquet"
        pq.write_table(sample.slice(start, 150), path)
        specs.append(DatasetSpec(name=name, source=str(path), id_column="id", prompt_column="prompt"))
    store = StoreConfig(duckdb_path=str(tmp_path / "shared.duckdb"), storage=str(tmp_path / "storage"), lock_timeout_seconds=300)
    sampling, sharding = SamplingConfig(max_tokens=4), ShardingConfig(shard_size=50)

    runs = [start_flow_process(spec.name, spec, tiny_model, sampling, sharding, store) for spec in specs]
    for run, spec in zip(runs, specs):
        assert run.wait(timeout=900) == 0, (tmp_path / f"{spec.name}.log").read_text()[-3000:]

    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        assert sorted(con.execute("SELECT dataset_name FROM runs").fetchall()) == [("first",), ("second",)]
        canonical_keys = con.execute("SELECT count(DISTINCT request_key) FROM requests WHERE duplicate_of IS NULL").fetchone()[0]
        assert con.execute("SELECT count(*), count(DISTINCT request_key) FROM outputs").fetchone() == (
            canonical_keys,
            canonical_keys,
        )  # the shared requests were answered once, not twice
        for run_id, requests in con.execute("SELECT run_id, requests FROM runs").fetchall():
            answered = con.execute("SELECT count(*) FROM run_outputs WHERE run_id = ?", [run_id]).fetchone()[0]
            assert answered == requests  # every request of each run has its answer
