"""Shard failures: configuration mistakes fail at once, transient ones retry, a kill -9 resumes."""

import contextlib
import os
import signal
import time
from pathlib import Path

import duckdb
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from flows.batch_inference import batch_inference
from tasks.config import SamplingConfig, ShardingConfig, StructuredOutput

pytestmark = pytest.mark.slow


def task_runs(state) -> list:
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_a_configuration_mistake_fails_at_once_without_retries(prefect_harness, tiny_model, tmp_path, sample_spec, store):
    state = batch_inference(
        dataset=sample_spec(20),
        model=tiny_model,
        sampling=SamplingConfig(max_tokens=4, structured=StructuredOutput(json_schema={"type": "objectx"})),
        sharding=ShardingConfig(shard_size=64, retries=3, retry_delay_seconds=[0]),
        store=store,
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="sampling parameters rejected by vLLM"):
        state.result()
    (shard_run,) = [run for run in task_runs(state) if run.name.startswith("generate-shard")]
    assert shard_run.run_count == 1  # no retry for a mistake
    assert not Path(tmp_path / "results.duckdb").exists()


def test_a_kill_9_mid_inference_resumes_from_the_finished_shards(
    prefect_harness, tiny_model, tmp_path, start_flow_process, sample_spec, store
):
    spec = sample_spec(1200)
    sampling, sharding = SamplingConfig(max_tokens=24), ShardingConfig(shard_size=40)
    run = start_flow_process("killed", spec, tiny_model, sampling, sharding, store)
    outputs_dir = Path(store.storage) / "outputs"
    # Prefect writes a shard's cache record after its task returns, so a kill can land between a
    # shard's file and its record: count the shards whose record is complete (what a re-run may use).
    records = ResultStore(result_storage=LocalFileSystem(basepath=str(Path(store.storage, "prefect-results").resolve())))

    def recorded_shards() -> set[str]:
        return {path.stem for path in outputs_dir.glob("*.parquet") if records.exists(path.stem)}

    try:
        while len(recorded_shards()) < 3:
            assert run.poll() is None, "the flow ended before it could be killed"
            time.sleep(0.1)
    finally:
        # the flow, its Prefect server and its vLLM engine at once; a group already gone must not
        # hide why the loop above failed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    recorded_at_kill = recorded_shards()
    assert not Path(store.duckdb_path).exists()  # killed before the commit

    summary = batch_inference(dataset=spec, model=tiny_model, sampling=sampling, sharding=sharding, store=store)

    # every shard recorded before the kill came back from the cache, and only those (a shard file
    # whose record the kill cut off is computed again) ...
    assert summary.cached_shards == len(recorded_at_kill) >= 3
    assert summary.cached_shards < summary.shards
    cached_requests = summary.unique_requests - summary.engine_requests
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        # ... and only the rest reached the engine. Shards finish out of order in the engine loop, so
        # the last one (smaller than 40) can be among the cached: count their real sizes.
        assert con.execute(
            "SELECT count(*), sum(requests) FROM run_shards WHERE run_id = ? AND cached", [summary.run_id]
        ).fetchone() == (summary.cached_shards, cached_requests)
        assert con.execute("SELECT count(*), count(DISTINCT request_key) FROM outputs").fetchone() == (
            summary.unique_requests,
            summary.unique_requests,
        )
        # duplicates (normalized text) are answered through duplicate_of, as run_outputs shows
        unanswered = con.execute(
            "SELECT count(*) FROM requests q WHERE NOT EXISTS (SELECT 1 FROM run_outputs r "
            "WHERE r.dataset_version = q.dataset_version AND r.custom_id = q.custom_id)"
        ).fetchone()[0]
    assert unanswered == 0  # none lost, none duplicated
