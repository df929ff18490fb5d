"""Where a batch's run runs: a `vbf run` process of the server's own, or a flow run of a deployment.

Both start the batch-inference flow on the batch's file with the served model's configuration, say
whether the run is still going (after a restart of the server too), and stop it so that what
finished is committed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tasks import storage
from tasks.config import DatasetSpec, MetricsConfig, ModelConfig, StoreConfig

PROGRESS_FILE = "progress.json"  # in a batch's folder: its local run's live progress, rewritten every second
LIVE_SECONDS = 10.0  # an older progress file is an earlier attempt's, or a run that stopped writing: not shown
STOP_GRACE_SECONDS = 120  # a stopped run commits what finished; past this it is killed
# Runs yield the CPU to the server: a poll answers at once even while the run's engine has every core.
RUN_NICENESS = 5


def yield_cpu_to_the_server() -> None:
    """In the run's process before it starts (its engine processes inherit it): a lower priority, and
    SCHED_BATCH, which tells the scheduler the run is throughput work, so the server's threads preempt
    it as soon as they wake (niceness alone shares the CPU by weight, not by wake-up latency)."""
    os.nice(RUN_NICENESS)
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


# metadata.priority → the gpu pool's work queue (`vbf cluster` makes them: high before default before low)
WORK_QUEUES = {"high": "high", "normal": "default", "low": "low"}


class LocalRuns:
    """Each run a `vbf run` process in a session of its own: it outlives the server, which finds it again by pid."""

    queues_itself = False  # the server starts `running_batches` at a time

    def __init__(self, store: StoreConfig, metrics: MetricsConfig):
        self.store, self.metrics = store, metrics
        self.children: dict[str, subprocess.Popen] = {}  # runs this server started (others it adopted after a restart)

    def start(self, batch_id: str, folder: Path, dataset: DatasetSpec, model: ModelConfig, priority: str) -> dict:
        spec, model_file = folder / "dataset.yaml", folder / "model.yaml"
        spec.write_text(yaml.safe_dump(dataset.model_dump(mode="json", exclude_defaults=True)))
        model_file.write_text(yaml.safe_dump(model.model_dump(mode="json", exclude_defaults=True)))
        command = [sys.executable, "-m", "flows.cli", "run", "--spec", str(spec), "--model", str(model_file)]
        command += ["--duckdb", self.store.duckdb_path, "--storage", self.store.storage, "--on-stop", "abort"]
        if self.metrics.port is not None:
            command += ["--metrics-port", str(self.metrics.port), "--metrics-host", self.metrics.host]
        command += ["--progress-file", str(folder / PROGRESS_FILE)]  # live counts for the page, between commits
        with open(folder / "run.log", "ab") as log_file:
            child = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=yield_cpu_to_the_server,
            )
        self.children[batch_id] = child
        return {"pid": child.pid}

    def alive(self, batch_id: str, run: dict) -> bool:
        child = self.children.get(batch_id)
        if child is not None:
            return child.poll() is None
        pid = run.get("pid")
        if not pid or not storage.process_alive(pid):
            return False
        try:  # the pid may since be another process's
            return batch_id in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False

    def stop(self, batch_id: str, run: dict) -> None:
        """SIGTERM (its engine aborts what is in flight; what finished is committed), a bounded wait, then SIGKILL."""
        if not self.alive(batch_id, run):
            return
        os.kill(run["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.alive(batch_id, run) and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.alive(batch_id, run):
            os.killpg(run["pid"], signal.SIGKILL)

    def where(self, run: dict) -> str:
        return f"process {run.get('pid')}"


class DeploymentRuns:
    """Each run a flow run of a deployment on a Prefect server, named after its batch, queued on the
    work queue of its priority: the Prefect UI shows the queue, and the pool's workers run it."""

    queues_itself = True  # every batch is submitted at once: the work queues' priorities order them

    def __init__(self, store: StoreConfig, deployment: str, metrics: MetricsConfig):
        self.store, self.deployment, self.metrics = store, deployment, metrics

    def start(self, batch_id: str, folder: Path, dataset: DatasetSpec, model: ModelConfig, priority: str) -> dict:
        from prefect import get_client

        parameters = {
            "dataset": dataset.model_dump(mode="json"),
            "model": model.model_dump(mode="json"),
            "store": self.store.model_dump(mode="json"),
            "sharding": {"on_stop": "abort"},
        }
        if self.metrics.port is not None:  # served by the worker's process, on the worker's machine
            parameters["metrics"] = self.metrics.model_dump(mode="json")
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(self.deployment)
            flow_run = client.create_flow_run_from_deployment(
                deployment.id, parameters=parameters, name=batch_id, work_queue_name=WORK_QUEUES[priority]
            )
        return {"flow_run_id": str(flow_run.id)}

    def alive(self, batch_id: str, run: dict) -> bool:
        from prefect import get_client

        if not run.get("flow_run_id"):
            return False
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run["flow_run_id"]).state
        return state is not None and not state.is_final()

    def stop(self, batch_id: str, run: dict) -> None:
        """Cancel the flow run: its worker stops the process (SIGTERM), which commits what finished."""
        from prefect import get_client
        from prefect.states import Cancelling

        if not self.alive(batch_id, run):
            return
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run["flow_run_id"], Cancelling(), force=True)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.alive(batch_id, run) and time.monotonic() < deadline:
            time.sleep(1)

    def where(self, run: dict) -> str:
        return f"flow run {run.get('flow_run_id')} of {self.deployment}"


def live_progress(run: dict) -> dict | None:
    """A local run's progress as its process last wrote it (requests, not lines: duplicates are counted
    once), or None: no file (a deployment's run, or not inferring yet), or one older than LIVE_SECONDS."""
    path = Path(run["folder"]) / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return progress if time.time() - progress.get("at", 0) <= LIVE_SECONDS else None
