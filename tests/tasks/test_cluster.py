"""The local cluster against itself: a real Prefect server, real process workers, real deployments.

One test, because the system takes minutes to start on a small machine: it deploys, runs
batch-inference on two worker groups through `prefect deployment run` with its storage on an
S3-compatible server (the groups share no folder) and kills one group's process mid-run, runs the
same input with dispatch="local", compares the two DuckDB files, lets a short interval schedule
start a run, sends a Batch API batch through `vbf serve` to the pool's high-priority queue and
cancels another, and checks that stopping leaves nothing running.
"""

import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tasks import storage
from tasks.cluster import REPO, LocalCluster, deployable_names, free_port, processes_with_home

pytestmark = [pytest.mark.slow, pytest.mark.longest]

OUTPUT_COLUMNS = "request_key, sample_index, text, finish_reason, prompt_tokens, completion_tokens, error_code"


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


def cache_records(group_run) -> list[str]:
    """Where the shard tasks of a group's flow run write their cache records (JSON manifests)."""
    from tasks.inference.job import InferenceJob
    from tasks.prepare.shard import Shard

    job = InferenceJob.model_validate(group_run.parameters["job"])
    return [job.manifest_path(Shard(**shard)) for shard in group_run.parameters["shards"]]


def settled_shard_runs(client, flow_run) -> list:
    """The shard task runs of a finished flow run, once the server has recorded all of them in a final
    state: task states reach the server as events, a little behind the flow run's own state."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    expected, deadline = len(flow_run.parameters["shards"]), time.monotonic() + 120
    while True:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run.id])))
        shards = [run for run in runs if run.name.startswith("generate-shard") and run.state and run.state.is_final()]
        if len(shards) >= expected or time.monotonic() > deadline:
            return shards
        time.sleep(1)


def scheduled_runs(client) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["sample"])))
    return [run for run in runs if run.auto_scheduled]


def query(path: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()


def run_deployment(cluster: LocalCluster, parameters: dict):
    """`prefect deployment run` as a user types it, then the run once it has ended (the API polled: see
    LocalCluster.wait_for for why not `--watch`)."""
    started = subprocess.run(
        [cluster.prefect, "deployment", "run", "batch-inference/sample", "--params", json.dumps(parameters)],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert started.returncode == 0, started.stdout[-4000:] + started.stderr[-4000:]
    return re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)


def run_a_batch_api_batch_on_the_pool(cluster: LocalCluster, tmp_path: Path) -> None:
    """`vbf serve` beside the cluster's server: a high-priority batch, sent with the official SDK, is a
    flow run of batch-inference/batch-api named after it on the gpu pool's `high` queue, run by a worker."""
    import openai

    port = free_port()
    store = ["--duckdb", str(tmp_path / "api.duckdb"), "--storage", str(tmp_path / "api-storage")]
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "vbf"),
                "serve",
                "--port",
                str(port),
                "--folder",
                str(tmp_path / "service"),
                *store,
            ],
            cwd=REPO,
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=3)
        lines = [
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": f"Hello number {i}"}], "max_tokens": 4},
            }
            for i in range(6)
        ]
        (tmp_path / "batch.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        deadline = time.monotonic() + 120
        while True:
            try:
                file = client.files.create(file=(tmp_path / "batch.jsonl").open("rb"), purpose="batch")
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"priority": "high"}
        )
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline + 900, f"batch still {batch.status}"
            time.sleep(2)
        assert batch.status == "completed", (batch, (tmp_path / "serve.log").read_text()[-3000:])
        output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(line["custom_id"] for line in output) == [f"c{i}" for i in range(6)]

        # Cancelled once its run has started (the six lines answered above count as completed then):
        # the flow run is cancelled, the six stay answered, every other line is batch_cancelled.
        long_lines = [
            {**lines[0], "custom_id": f"long{i}", "body": {**lines[0]["body"], "max_tokens": 200, "messages": story}}
            for i in range(600)
            for story in [[{"role": "user", "content": f"Write a long story number {i}"}]]
        ]
        (tmp_path / "long.jsonl").write_text("".join(json.dumps(line) + "\n" for line in [*lines, *long_lines]))
        file = client.files.create(file=(tmp_path / "long.jsonl").open("rb"), purpose="batch")
        cancelled = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        while (cancelled := client.batches.retrieve(cancelled.id)).request_counts.completed < 6:
            assert cancelled.status in ("validating", "in_progress") and time.monotonic() < deadline + 1800, cancelled
            time.sleep(1)
        assert client.batches.cancel(cancelled.id).status == "cancelling"
        while (cancelled := client.batches.retrieve(cancelled.id)).status == "cancelling":
            assert time.monotonic() < deadline + 2100, "the cancelled batch never ended"
            time.sleep(2)
        assert cancelled.status == "cancelled", (cancelled, (tmp_path / "serve.log").read_text()[-3000:])
        answered = [json.loads(line) for line in client.files.content(cancelled.output_file_id).text.splitlines()]
        errors = [json.loads(line) for line in client.files.content(cancelled.error_file_id).text.splitlines()]
        assert {f"c{i}" for i in range(6)} <= {line["custom_id"] for line in answered}
        assert {line["error"]["code"] for line in errors} == {"batch_cancelled"} and len(answered) + len(errors) == 606
    finally:
        server.terminate()
        server.wait(timeout=60)

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with cluster.client() as prefect:
        (flow_run,) = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[batch.id])))
        assert flow_run.state.is_completed() and flow_run.work_queue_name == "high"
        (stopped,) = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[cancelled.id])))
        assert stopped.state.is_cancelled() and stopped.work_queue_name == "default"
        assert prefect.read_deployment(flow_run.deployment_id).name == "batch-api"
        queues = {queue.name: queue.priority for queue in prefect.read_work_queues(work_pool_name="gpu")}
        assert queues["high"] < queues["default"] < queues["low"]
    assert sorted(query(tmp_path / "api.duckdb", "SELECT run_id, status FROM runs")) == sorted(
        [(str(flow_run.id), "completed"), (str(stopped.id), "cancelled")]
    )


def test_the_cluster_deploys_runs_on_two_worker_groups_survives_a_kill_and_schedules(
    tmp_path, tiny_model_dir, sample_parquet, s3_server, s3_bucket
):
    data = tmp_path / "forty.parquet"
    pq.write_table(pq.read_table(sample_parquet).slice(0, 40), data)
    dataset = {"name": "forty", "source": str(data), "id_column": "id", "prompt_column": "prompt"}
    common = {
        "dataset": dataset,
        "sampling": {"max_tokens": 4},
        "sharding": {"shard_size": 4, "gpu_limit": "gpu", "retries": 0},
    }
    # The groups' shard files and cache records live in a bucket of the S3 server: they share no folder.
    duckdb_path = tmp_path / "results.duckdb"
    on_workers = {
        **common,
        "store": {"duckdb_path": str(duckdb_path), "storage": f"{s3_bucket}/storage"},
        "dispatch": "workers",
        "n_workers": 2,
        "workers": {"group_retries": 2},
    }
    local_store = {"duckdb_path": str(tmp_path / "local.duckdb"), "storage": str(tmp_path / "local-storage")}
    # The workers reach the S3 server as a user's would reach theirs: by the standard AWS variables.
    cluster = LocalCluster(tmp_path / "prefect", results=tmp_path / "results", python=sys.executable, extra_env=s3_server)
    try:
        cluster.start()
        assert set(deployable_names(REPO / "prefect.yaml")) >= {"sample", "generate-shards"}

        # On two worker groups; group 0's process is killed once one of its shards is in the cache (its
        # record written): the group is run again, and the shards it had finished are not computed again.
        killed_run = run_deployment(cluster, on_workers)
        with cluster.client() as client:
            deadline = time.monotonic() + 900
            while True:
                assert time.monotonic() < deadline, "group 0 never finished a shard"
                first = [r for r in group_runs(client, 0) if r.state.is_running()]
                if first and any(storage.exists(record) for record in cache_records(first[0])):
                    assert kill_flow_run_process(first[0].id)
                    break
                time.sleep(0.3)
        assert cluster.wait_for(killed_run).state.is_completed()

        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
        from prefect.client.schemas.schedules import IntervalSchedule

        with cluster.client() as client:
            (parent,) = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["sample"])))
            assert parent.state.is_completed()
            groups = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["generate-shards"]))
            )
            # two groups (under load the client may create a group's run twice; both then end)
            assert {"-".join(run.name.split("-")[-2:]) for run in groups} == {"group-0", "group-1"}
            assert {run.parent_task_run_id is not None for run in groups} == {True}  # linked to the parent run
            attempts = [r for r in group_runs(client, 0) if r.name.startswith(first[0].name)]
            assert [r.state.type.value for r in attempts] == ["CRASHED", "COMPLETED"]
            assert any(t.state.name == "Cached" for t in settled_shard_runs(client, attempts[1]))  # not computed again
            assert all(run.state.is_completed() for run in group_runs(client, 1))
            artifact_keys = {a.key for a in client.read_artifacts() if a.flow_run_id == parent.id}
            assert {"batch-inference-summary", "batch-inference-progress", "batch-inference-report"} <= artifact_keys

        (summary,) = query(duckdb_path, "SELECT run_id, shards, cached_shards, outputs, errors, unique_requests FROM runs")
        assert summary[0] == str(parent.id)
        assert summary[1] > 2 and summary[3] == summary[5] and summary[4] == 0
        # every request answered once: none lost with the killed group, none computed twice
        assert query(duckdb_path, "SELECT count(*), count(DISTINCT request_key) FROM outputs")[0] == (summary[5], summary[5])
        manifests = storage.list_files(storage.join(on_workers["store"]["storage"], "outputs"), ".json")
        assert len(manifests) == summary[1]

        # The same input run in one process gives the same results.
        locally = cluster.wait_for(run_deployment(cluster, {**common, "dispatch": "local", "store": local_store}))
        assert locally.state.is_completed(), locally.state
        sql = f"SELECT {OUTPUT_COLUMNS} FROM outputs ORDER BY request_key, sample_index"
        assert query(Path(local_store["duckdb_path"]), sql) == query(duckdb_path, sql)

        # A short interval schedule starts a run of its own. Once a worker has taken it, the schedule is
        # deleted (which removes the runs it queued after it), so the server carries one run, not one per 10 s.
        with cluster.client() as client:
            deployment = client.read_deployment_by_name("batch-inference/sample")
            client.create_deployment_schedules(
                deployment.id, [(IntervalSchedule(interval=timedelta(seconds=10)), True)], parameters=on_workers
            )
            deadline = time.monotonic() + 600
            while not (taken := [run for run in scheduled_runs(client) if not run.state.is_scheduled()]):
                assert time.monotonic() < deadline, "no worker took a scheduled run"
                time.sleep(2)
            for schedule in client.read_deployment_schedules(deployment.id):
                client.delete_deployment_schedule(deployment.id, schedule.id)
            while not (run := client.read_flow_run(taken[0].id)).state.is_final():
                assert time.monotonic() < deadline, f"the scheduled run did not finish: {run.state}"
                time.sleep(2)
            assert run.state.is_completed(), run.state
        # Nothing new to compute: the requests are answered from the first run (no engine, no group runs).
        rerun = query(
            duckdb_path, "SELECT shards, cached_shards, engine_requests, reused_requests FROM runs ORDER BY started_at"
        )[1]
        assert rerun[0] == rerun[1] and rerun[2] == 0 and rerun[3] == summary[5]

        run_a_batch_api_batch_on_the_pool(cluster, tmp_path)
    finally:
        stopping = time.monotonic()
        cluster.stop()
        assert time.monotonic() - stopping < 60  # bounded waits, then kill
        assert not processes_with_home(cluster.home), "left running after stop()"
