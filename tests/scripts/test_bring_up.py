"""The bring-up script against itself: a real Prefect server, real process workers, real deployments.

One test, because the system takes minutes to start on a small machine: it deploys, runs
batch-inference on two worker groups through `prefect deployment run --watch`, runs the same input
with dispatch="local", compares the two DuckDB files, lets a short interval schedule start a run,
and checks that nothing it started is left running.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SAMPLE_PARQUET = REPO / "datasets" / "sample" / "prompts.parquet"
OUTPUT_COLUMNS = "request_key, sample_index, text, finish_reason, prompt_tokens, completion_tokens, error_code"


def load_bring_up():
    spec = importlib.util.spec_from_file_location("bring_up", REPO / "scripts" / "bring_up.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def group_runs(client, group: int) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["generate-shards"])))
    return sorted((r for r in runs if r.name.endswith(f"-group-{group}")), key=lambda r: r.created)


def kill_flow_run_process(flow_run_id) -> bool:
    """SIGKILL the flow run's own process (not its vLLM engine processes), as the OOM killer would."""
    for proc in Path("/proc").iterdir():
        try:
            if b"prefect.engine" in (proc / "cmdline").read_bytes() and f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in (
                proc / "environ"
            ).read_bytes().split(b"\0"):
                os.kill(int(proc.name), 9)
                return True
        except (OSError, ValueError):
            continue
    return False


def processes_with_home(home: Path) -> list[str]:
    """Command lines of live processes started under this PREFECT_HOME."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError):
            continue
    return found


def query(path: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()


def run_deployment_cli(cluster, parameters: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [cluster.prefect, "deployment", "run", "batch-inference/sample", "--params", json.dumps(parameters),
         "--watch", "--watch-timeout", "1200"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=1300,
    )  # fmt: skip


def test_bring_up_deploys_runs_on_two_worker_groups_and_schedules(tmp_path, tiny_model_dir):
    bring_up = load_bring_up()
    data = tmp_path / "forty.parquet"
    pq.write_table(pq.read_table(SAMPLE_PARQUET).slice(0, 40), data)
    dataset = {"name": "forty", "source": str(data), "id_column": "id", "prompt_column": "prompt"}
    common = {
        "dataset": dataset,
        "sampling": {"max_tokens": 4},
        "sharding": {"shard_size": 8, "gpu_limit": "gpu", "retries": 0},
    }
    results = tmp_path / "results"  # the `local-results` block the deployment names points here
    local_store = {"duckdb_path": str(tmp_path / "local.duckdb"), "storage": str(tmp_path / "local-storage")}
    watch = None
    cluster = bring_up.LocalCluster(
        tmp_path / "prefect", results=results, python=sys.executable
    )
    try:
        cluster.start()
        assert set(bring_up.deployable_names(REPO / "prefect.yaml")) >= {"sample", "generate-shards"}

        on_workers = run_deployment_cli(cluster, {**common, "dispatch": "workers", "n_workers": 2})
        assert on_workers.returncode == 0, on_workers.stdout[-4000:] + on_workers.stderr[-4000:]
        assert "Completed" in on_workers.stdout

        from prefect import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
        from prefect.client.schemas.schedules import IntervalSchedule
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: cluster.api_url}), get_client(sync_client=True) as client:
            (parent,) = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["sample"]))
            )
            assert parent.state.is_completed()
            groups = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["generate-shards"]))
            )
            assert len(groups) == 2 and all(run.state.is_completed() for run in groups)
            assert {run.parent_task_run_id is not None for run in groups} == {True}  # linked to the parent run
            artifact_keys = {a.key for a in client.read_artifacts() if a.flow_run_id == parent.id}
            assert {"batch-inference-summary", "batch-inference-progress", "batch-inference-report"} <= artifact_keys

        duckdb_path = results / "results.duckdb"
        (summary,) = query(duckdb_path, "SELECT run_id, shards, cached_shards, outputs, errors, unique_requests FROM runs")
        assert summary[0] == str(parent.id)
        assert summary[1] > 2 and summary[2] == 0 and summary[3] == summary[5] and summary[4] == 0
        assert query(duckdb_path, "SELECT count(*) FROM outputs")[0][0] == summary[5]

        # The same input run in one process gives the same results.
        locally = run_deployment_cli(cluster, {**common, "dispatch": "local", "store": local_store})
        assert locally.returncode == 0, locally.stdout[-4000:] + locally.stderr[-4000:]
        sql = f"SELECT {OUTPUT_COLUMNS} FROM outputs ORDER BY request_key, sample_index"
        assert query(Path(local_store["duckdb_path"]), sql) == query(duckdb_path, sql)

        # A group whose process dies is run again; the shards it had finished come from the cache.
        killed_store = {"duckdb_path": str(tmp_path / "killed.duckdb"), "storage": str(tmp_path / "killed-storage")}
        killed_params = {
            **common, "sampling": {"max_tokens": 5}, "sharding": {**common["sharding"], "shard_size": 2},
            "store": killed_store, "dispatch": "workers", "n_workers": 2, "workers": {"group_retries": 2},
        }  # fmt: skip
        watch = subprocess.Popen(
            [cluster.prefect, "deployment", "run", "batch-inference/sample", "--params", json.dumps(killed_params),
             "--watch", "--watch-timeout", "1200"],
            cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

        with temporary_settings({PREFECT_API_URL: cluster.api_url}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 900
            while True:  # kill group 0 of this run once it has finished a shard
                assert watch.poll() is None and time.monotonic() < deadline, "group 0 never finished a shard"
                first = [r for r in group_runs(client, 0) if r.created > parent.created and r.state.is_running()]
                if first:
                    finished = client.read_task_runs(task_run_filter=TaskRunFilter(
                        flow_run_id=TaskRunFilterFlowRunId(any_=[first[0].id])))  # fmt: skip
                    if any(t.name.startswith("generate-shard") and t.state and t.state.is_completed() for t in finished):
                        assert kill_flow_run_process(first[0].id)
                        break
                time.sleep(0.3)
        output, _ = watch.communicate(timeout=1300)
        assert watch.returncode == 0, output[-4000:]
        with temporary_settings({PREFECT_API_URL: cluster.api_url}), get_client(sync_client=True) as client:
            attempts = [r for r in group_runs(client, 0) if r.created > parent.created and r.name.startswith(first[0].name)]
            assert [r.state.type.value for r in attempts] == ["CRASHED", "COMPLETED"]
            retried = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[attempts[1].id])))
            assert any(t.state.name == "Cached" for t in retried)  # not computed again
        killed_db = Path(killed_store["duckdb_path"])
        assert query(killed_db, "SELECT outputs, errors, unique_requests FROM runs")[0] == (summary[5], 0, summary[5])
        assert query(killed_db, "SELECT count(*), count(DISTINCT request_key) FROM outputs")[0] == (summary[5], summary[5])

        # A short interval schedule starts a run of its own.
        with temporary_settings({PREFECT_API_URL: cluster.api_url}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("batch-inference/sample")
            client.create_deployment_schedules(
                deployment.id,
                [(IntervalSchedule(interval=timedelta(seconds=10)), True)],
                parameters={**common, "dispatch": "workers", "n_workers": 2},
            )
            deadline = time.monotonic() + 600
            while True:
                scheduled = [
                    run
                    for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(), deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=["sample"])))
                    if run.auto_scheduled
                ]  # fmt: skip
                if any(run.state.is_completed() for run in scheduled):
                    break
                assert not any(run.state.is_final() and not run.state.is_completed() for run in scheduled), scheduled
                assert time.monotonic() < deadline, "no scheduled run completed"
                time.sleep(3)
            for schedule in client.read_deployment_schedules(deployment.id):
                client.delete_deployment_schedule(deployment.id, schedule.id)
        # Nothing new to compute: the requests are answered from the first run (no engine, no group runs).
        rerun = query(duckdb_path, "SELECT shards, cached_shards, engine_requests, reused_requests FROM runs ORDER BY started_at")[1]
        assert rerun[0] == rerun[1] and rerun[2] == 0 and rerun[3] == summary[5]
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
            watch.wait()
        cluster.stop()
        time.sleep(1)
        left = processes_with_home(cluster.home)
        assert not left, f"left running: {left}"
