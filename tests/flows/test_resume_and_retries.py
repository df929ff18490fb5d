"""Shard failures: configuration mistakes fail at once, transient ones retry, a kill -9 resumes."""

import contextlib
import os
import signal
import time
from pathlib import Path

import duckdb
import psutil
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

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
    with duckdb.connect(store.duckdb_path, read_only=True) as con:  # the run says it failed, with nothing answered
        assert con.execute("SELECT status, outputs FROM runs").fetchall() == [("failed", 0)]
        assert con.execute("SELECT count(*) FROM outputs").fetchone() == (0,)


def saved_request_keys(store) -> set[str]:
    """What a killed run left for the next: committed outputs, journaled parts, and shard output files."""
    storage = Path(store.storage)
    files = [*storage.glob("journal/*/part-*.parquet"), *storage.glob("outputs/*.parquet")]
    keys = {key for path in files for key in pq.read_table(path, columns=["request_key"])["request_key"].to_pylist()}
    if Path(store.duckdb_path).exists():
        with duckdb.connect(store.duckdb_path) as con:  # not read-only: it replays what a killed commit left
            keys |= {row[0] for row in con.execute("SELECT request_key FROM outputs").fetchall()}
    return keys


def committed_while_running(store) -> int:
    """Outputs a reader sees in the results file while the run writes it (0 while a commit holds it)."""
    try:
        with duckdb.connect(store.duckdb_path, read_only=True) as con:
            return con.execute("SELECT count(*) FROM run_outputs").fetchone()[0]
    except (duckdb.IOException, duckdb.CatalogException):  # held by a commit, or not created yet
        return 0


def journal_parts(storage: Path) -> list[int]:
    """Parts journaled per shard in flight. A shard of 38 parts with at most 30 of them is seconds from
    finishing and removing its journal, so a kill right after seeing it falls inside the shard."""
    return [len(list(folder.glob("part-*.parquet"))) for folder in storage.glob("journal/*")]


def command_line(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(process.cmdline())
    return ""


def outlived(processes: list[psutil.Process], seconds: float) -> list[str]:
    """The command lines of these processes still running after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        left = []
        for process in processes:
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(command_line(process)[:120])
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_a_kill_9_mid_inference_recomputes_only_what_was_in_the_engine(
    prefect_harness, tiny_model, tmp_path, start_flow_process, sample_spec, store
):
    spec = sample_spec(1200)
    sampling = SamplingConfig(max_tokens=24)
    sharding = ShardingConfig(shard_size=300, part_size=8, shards_in_flight=2)
    # a batch of 8 makes parts finish one after another on any machine: with the engine's default batch
    # a shard's 19 parts can finish together, and the kill would find none half-journaled
    killed_engine = tiny_model.model_copy(update={"max_num_seqs": 8})
    run = start_flow_process("killed", spec, killed_engine, sampling, sharding, store)
    storage = Path(store.storage)
    seen = {"committed": 0, "parts": set()}  # what the watch saw, for a failure's message
    try:  # kill in the middle of shards: once a shard is committed and a shard in flight is partly journaled
        while True:
            committed, parts = committed_while_running(store), journal_parts(storage)
            seen["committed"], seen["parts"] = max(seen["committed"], committed), seen["parts"] | set(parts)
            if committed and any(3 <= n <= 30 for n in parts):
                break
            assert run.poll() is None, f"the flow ended before it could be killed; the watch saw {seen}"
            time.sleep(0.05)
        started = psutil.Process(run.pid).children(recursive=True)
        commands = [command_line(process) for process in started]
        os.kill(run.pid, signal.SIGKILL)  # the flow's process alone, as the out-of-memory killer would
        run.wait()
        # its reaper ends what it started: vLLM's engine processes and Prefect's temporary server
        assert outlived(started, seconds=15) == []
        assert any("VLLM::EngineCore" in c for c in commands) and any("server:create_app" in c for c in commands)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left, so a failure here leaks nothing
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    saved = saved_request_keys(store)
    journaled = {
        key for path in storage.glob("journal/*/part-*.parquet") for key in pq.read_table(path)["request_key"].to_pylist()
    }
    with duckdb.connect(store.duckdb_path) as con:  # the killed run's row has the live counts of what it committed
        killed_run = con.execute("SELECT status, outputs FROM runs").fetchall()
        committed = con.execute("SELECT count(*) FROM outputs").fetchone()[0]
    assert committed >= 300 and killed_run == [("running", committed)]

    summary = batch_inference(dataset=spec, model=tiny_model, sampling=sampling, sharding=sharding, store=store)

    # nothing saved is computed again, the finished parts of unfinished shards included (resume by the
    # row, not by the shard); what the engine had in flight at the kill and what had not started go again
    assert summary.engine_requests == summary.unique_requests - len(saved)
    assert journaled  # the kill fell inside shards: their finished parts were kept
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT request_key) FROM outputs").fetchone() == (
            summary.unique_requests,
            summary.unique_requests,
        )
        # duplicates (identical requests) are answered through duplicate_of, as run_outputs shows
        unanswered = con.execute(
            "SELECT count(*) FROM requests q WHERE NOT EXISTS (SELECT 1 FROM run_outputs r "
            "WHERE r.run_id = ? AND r.dataset_version = q.dataset_version AND r.custom_id = q.custom_id)",
            [summary.run_id],
        ).fetchone()[0]
        statuses = dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    assert unanswered == 0  # none lost, none duplicated
    assert statuses == {"running": 1, "completed": 1}  # the killed run could not say how it ended
    assert not list(storage.glob("journal/*"))  # every part ended up in an output file


def test_sigterm_stops_admitting_commits_what_finished_and_marks_the_run_cancelled(
    prefect_harness, tiny_model, tmp_path, start_flow_process, sample_spec, store
):
    spec = sample_spec(1200)
    sampling = SamplingConfig(max_tokens=24)
    sharding = ShardingConfig(shard_size=100, part_size=25, shards_in_flight=2)
    run = start_flow_process("stopped", spec, tiny_model, sampling, sharding, store)
    while not committed_while_running(store):
        assert run.poll() is None, "the flow ended before it could be stopped"
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGTERM)
    try:
        run.wait(timeout=120)  # the shards in flight finish; nothing new starts
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    with duckdb.connect(store.duckdb_path) as con:
        ((status, outputs, finished_at),) = con.execute("SELECT status, outputs, finished_at FROM runs").fetchall()
        committed = con.execute("SELECT count(*) FROM outputs").fetchone()[0]
        shards_committed, requests_committed = con.execute("SELECT count(*), sum(requests) FROM run_shards").fetchone()
        unique_requests = con.execute("SELECT unique_requests FROM dataset_versions").fetchone()[0]
    assert status == "cancelled" and finished_at is not None
    assert outputs == committed == requests_committed  # every finished shard committed, whole
    assert committed < unique_requests  # it stopped before the end
    assert not list(Path(store.storage).glob("journal/*"))  # the shards in flight finished rather than left parts

    summary = batch_inference(dataset=spec, model=tiny_model, sampling=sampling, sharding=sharding, store=store)
    assert summary.reused_requests == committed  # the next run goes on from there
    assert summary.engine_requests == summary.unique_requests - committed
