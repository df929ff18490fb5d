"""Bring up the whole system on this machine: a Prefect server, work pools, workers, blocks, deployments.

    python scripts/bring_up.py up [--port 4200] [--home .cache/cluster]   # until Ctrl-C (`make cluster`)
    python scripts/bring_up.py blocks                                        # register block types, save defaults

`up` starts `prefect server start` on 127.0.0.1 (SQLite in its PREFECT_HOME), creates the process work
pools `gpu` and `cpu` and the global concurrency limit `gpu`, registers the block types and saves the
default blocks, deploys every deployment of prefect.yaml whose flow file exists, then starts two
process workers on `gpu` and one on `cpu`. Every process runs in its own process group; stopping
(Ctrl-C, an error, or the end of a test) ends each group, flow runs and vLLM engines included.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


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
    tiny = ModelConfig(model=model_dir, max_model_len=1024, gpu_memory_utilization=0.1)
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
                [self.prefect, *args], cwd=REPO, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends it with all its children
            )  # fmt: skip
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
        self.cli("global-concurrency-limit", "create", "gpu", "--limit", str(self.gpu_slots))
        self.cli("block", "register", "-m", "blocks")
        self.run_python(
            "import sys; from scripts.bring_up import save_default_blocks; save_default_blocks(*sys.argv[1:])",
            ".cache/models/tiny-llama", str(self.results / "results.duckdb"), str(self.results / "storage"),
        )  # fmt: skip
        self.cli("deploy", *[arg for name in deployable_names(REPO / "prefect.yaml") for arg in ("--name", name)])
        for pool, count in (("gpu", self.gpu_workers), ("cpu", self.cpu_workers)):
            for i in range(1, count + 1):
                self.spawn(f"{pool}-worker-{i}", "worker", "start", "--pool", pool, "--name", f"{pool}-worker-{i}", "--type", "process")
        return self

    def run_python(self, code: str, *args: str) -> None:
        subprocess.run([self.python, "-c", code, *args], cwd=REPO, env=self.env, check=True, timeout=300)

    def stop(self) -> None:
        """Workers first (their flow runs and engines are in their groups), the server last."""
        for _, process in reversed(self.processes):
            self._signal(process, signal.SIGTERM)
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            self._signal(process, signal.SIGKILL)  # whatever of its group is left
            process.wait()
        self.processes.clear()

    @staticmethod
    def _signal(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_on_sigterm(*_) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "blocks"])
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--home", help="PREFECT_HOME of the server (default: a new temporary folder)")
    args = parser.parse_args()
    if args.command == "blocks":
        save_default_blocks(".cache/models/tiny-llama", "results/results.duckdb", "results/storage")
        return
    home = Path(args.home or tempfile.mkdtemp(prefix="prefect-cluster-"))
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    with LocalCluster(home, port=args.port) as cluster:
        print(f"Prefect UI: http://127.0.0.1:{cluster.port}  (logs in {home / 'logs'}; Ctrl-C stops everything)")
        print(f"  PREFECT_API_URL={cluster.api_url} prefect deployment run 'batch-inference/sample' --watch")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
