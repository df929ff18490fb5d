"""The local cluster (`vbf cluster`): a Prefect server, work pools, workers, blocks and deployments on this machine.

`LocalCluster.start` runs `prefect server start` on 127.0.0.1 (SQLite in its PREFECT_HOME, or the
database URL given), creates the process work pools `gpu` and `cpu` and the global concurrency
limit `gpu`, registers the block types and saves the default blocks, deploys every deployment of
prefect.yaml whose flow file exists, then starts two process workers on `gpu` and one on `cpu`.

Every process runs in its own process group, and every process it starts carries its PREFECT_HOME:
stopping (Ctrl-C, an error, or the end of a test) ends each group, then anything left that carries
that home (flow runs and vLLM engines included), each wait bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# A busy SQLite server answers 503 when a write waits too long for its lock: clients retry with
# exponential backoff (2, 4, ... 128 s: four minutes in all) rather than fail the run.
CLIENT_RETRIES = "7"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployable_names(prefect_yaml: Path) -> list[str]:
    """Deployments whose flow file is in this checkout (`prefect deploy --all` fails on a missing one)."""
    deployments = yaml.safe_load(prefect_yaml.read_text())["deployments"]
    return [d["name"] for d in deployments if (prefect_yaml.parent / d["entrypoint"].split(":")[0]).is_file()]


def save_default_blocks(model_dir: str, duckdb_path: str, storage: str) -> None:
    """The blocks prefect.yaml's deployments name: the tiny CPU model and a local results store."""
    from blocks.model import InferenceModel
    from blocks.store import ResultsStore
    from tasks.config import ModelConfig, StoreConfig

    # 0.1 of RAM each: two engines (two worker groups) fit beside each other on a small machine.
    tiny = ModelConfig(model=model_dir, max_model_len=1024, gpu_memory_utilization=0.1, enforce_eager=True)
    InferenceModel(config=tiny).save("tiny-cpu", overwrite=True)
    ResultsStore(config=StoreConfig(duckdb_path=duckdb_path, storage=storage)).save("local-results", overwrite=True)


class LocalCluster:
    """Server, pools, workers, blocks and deployments; `with LocalCluster(...) as cluster:` stops all of it."""

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        python: str = sys.executable,
        gpu_workers: int = 2,
        cpu_workers: int = 1,
        gpu_slots: int = 2,
        results: Path | None = None,
        extra_env: dict[str, str] | None = None,
        database_url: str | None = None,
    ):
        self.home = Path(home).resolve()
        self.port = port or free_port()
        self.python = python
        self.prefect = str(Path(python).parent / "prefect")
        self.gpu_workers, self.cpu_workers, self.gpu_slots = gpu_workers, cpu_workers, gpu_slots
        self.results = Path(results or REPO / "results").resolve()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_CLIENT_MAX_RETRIES": CLIENT_RETRIES,
            **({"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}),
            # Flow runs import this checkout's flows and tasks, whatever else is installed.
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            **(extra_env or {}),
        }

    # --- processes ---------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(name), "w") as log:
            process = subprocess.Popen(
                [self.prefect, *args],
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends it with all its children
            )
        self.processes.append((name, process))
        return process

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [self.prefect, "--no-prompt", *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600
        )
        if result.returncode:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def wait_for_server(self, timeout: float = 180) -> None:
        server = self.processes[0][1]
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{self.log_path('server').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer:\n{self.log_path('server').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)

    # --- the system ----------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        self.home.mkdir(parents=True, exist_ok=True)
        self.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
        self.wait_for_server()
        for pool in ("gpu", "cpu"):
            self.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
        # The Batch API's priorities (metadata.priority): workers take high before default before low.
        self.cli("work-queue", "create", "high", "--pool", "gpu", "--priority", "1")
        self.cli("work-queue", "create", "low", "--pool", "gpu", "--priority", "3")
        self.cli("global-concurrency-limit", "create", "gpu", "--limit", str(self.gpu_slots))
        self.cli("block", "register", "-m", "blocks")
        self.run_python(
            "import sys; from tasks.cluster import save_default_blocks; save_default_blocks(*sys.argv[1:])",
            ".cache/models/tiny-llama",
            str(self.results / "results.duckdb"),
            str(self.results / "storage"),
        )
        self.cli("deploy", *[arg for name in deployable_names(REPO / "prefect.yaml") for arg in ("--name", name)])
        for pool, count in (("gpu", self.gpu_workers), ("cpu", self.cpu_workers)):
            for i in range(1, count + 1):
                self.spawn(
                    f"{pool}-worker-{i}", "worker", "start", "--pool", pool, "--name", f"{pool}-worker-{i}", "--type", "process"
                )
        return self

    @contextlib.contextmanager
    def client(self):
        """A Prefect client of this cluster's server that retries a busy server's answers as its processes do."""
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        settings = {PREFECT_API_URL: self.api_url, PREFECT_CLIENT_MAX_RETRIES: int(CLIENT_RETRIES)}
        with temporary_settings(settings), get_client(sync_client=True) as client:
            yield client

    def wait_for(self, flow_run_id, timeout: float = 1200):
        """The flow run once it has ended, read by polling the API (bounded by `timeout`).

        `prefect deployment run --watch` follows Prefect's event stream instead, which on a busy
        server can miss a run's last event and then waits out its whole timeout.
        """
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while not (run := client.read_flow_run(flow_run_id)).state.is_final():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"flow run {run.name} still {run.state.name} after {timeout:.0f} s")
                time.sleep(2)
        return run

    def run_deployment(self, name: str, parameters: dict, timeout: float = 1200):
        """Start a run of a deployment ('flow/deployment') and return it once it has ended."""
        with self.client() as client:
            deployment = client.read_deployment_by_name(name)
            run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        return self.wait_for(run.id, timeout)

    def run_python(self, code: str, *args: str) -> None:
        subprocess.run([self.python, "-c", code, *args], cwd=REPO, env=self.env, check=True, timeout=300)

    def stop(self, grace_seconds: float = 20) -> None:
        """SIGTERM to every group, a bounded wait, then SIGKILL to the groups and to whatever else carries
        this PREFECT_HOME (a flow run or an engine that left its group). Never waits without a bound."""
        for _, process in reversed(self.processes):
            self._signal(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for _, process in reversed(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            self._signal(process, signal.SIGKILL)  # whatever of its group is left
        for pid in processes_with_home(self.home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _, process in self.processes:
            # A process stuck in the kernel cannot be killed: give up on it after a bound.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self.processes.clear()

    @staticmethod
    def _signal(process: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def processes_with_home(home: Path) -> list[int]:
    """Live processes started under this PREFECT_HOME (read from /proc; none where there is no /proc)."""
    marker = f"PREFECT_HOME={home}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) != os.getpid() and marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def stop_on_sigterm(*_) -> None:
    raise KeyboardInterrupt


def run_until_interrupted(home: Path, port: int, database_url: str | None = None) -> None:
    """`vbf cluster`: bring everything up, print where it is, and stop it all on Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    with LocalCluster(home, port=port, database_url=database_url) as cluster:
        print(f"Prefect UI: http://127.0.0.1:{cluster.port}  (logs in {home / 'logs'}; Ctrl-C stops everything)")
        print(f"  PREFECT_API_URL={cluster.api_url} prefect deployment run 'batch-inference/sample' --watch")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
