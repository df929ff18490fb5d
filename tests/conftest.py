"""Shared fixtures: the tiny model, one vLLM engine per session, the Prefect test harness, sample data,
results files and their rows (built from the store's row models), and read-only views of a results file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def bind_engines_to_a_core_of_this_test_process() -> None:
    """Under `pytest -n 2` vLLM's automatic OpenMP binding puts every process's engine on core 0 (it keeps
    the last core for the engine's scheduler), so the two test processes' engines would compute on one core
    and a timed test beside the other's engine runs many times slower. Each test process's engines (and
    the `vbf`, `vllm serve` and worker processes its tests start, which inherit this) take a core of their own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker:
        cores = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cores[int(worker.removeprefix("gw")) % len(cores)]))


bind_engines_to_a_core_of_this_test_process()

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = REPO / ".cache" / "models" / "tiny-llama"
SAMPLE_PARQUET = REPO / "datasets" / "sample" / "prompts.parquet"


# ---------------------------------------------------------------- model, engine, Prefect


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), str(TINY_MODEL_DIR)], check=True)
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir) -> Path:
    return tiny_model_dir.with_name(tiny_model_dir.name + "-lora")  # built by the same script


@pytest.fixture(scope="session")
def tiny_thinking_model_dir(tiny_model_dir) -> Path:
    """The tiny model with <think> and </think> tokens (built by the same script)."""
    return tiny_model_dir.with_name(tiny_model_dir.name + "-thinking")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The one engine configuration of the session: every test that uses it shares one vLLM engine.

    LoRA is enabled so runs with and without an adapter share the engine too.
    """
    from tasks.config import ModelConfig

    return ModelConfig(
        model=str(tiny_model_dir),
        max_model_len=256,
        gpu_memory_utilization=0.1,
        enable_lora=True,
        max_lora_rank=8,
        enforce_eager=True,  # compiling costs a start far more than it saves the tiny model
    )


def pytest_collection_modifyitems(items):
    """The longest tests first (with `-n 2` one process takes them while the other runs the rest); tests
    that replace the session's engine last, so the others keep sharing one engine."""
    items.sort(
        key=lambda item: (item.get_closest_marker("longest") is None, item.get_closest_marker("replaces_engine") is not None)
    )


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # The harness does not isolate result storage: give the session its own folder.
    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def close_engine_at_exit():
    yield
    from tasks.engines.vllm import close_engine

    close_engine()


@pytest.fixture(scope="session")
def overwrite_weights():
    """Save same-shaped new weights (other values, same file size) over a model folder's, as a fine-tune would be."""

    def overwrite_weights(folder, seed: int = 1) -> None:
        """Same-shaped new weights (different values, same file size), saved over the old file as a fine-tune would be."""
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = folder / "model.safetensors"
        size = path.stat().st_size
        with safe_open(str(path), "pt") as weights:
            metadata = weights.metadata()
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 - safe_open is not iterable
        generator = torch.Generator().manual_seed(seed)
        fresh = {
            name: (torch.randn(t.shape, generator=generator) * (t.float().std() + 1e-3)).to(t.dtype)
            for name, t in tensors.items()
        }
        save_file(fresh, str(path), metadata=metadata)
        assert path.stat().st_size == size

    return overwrite_weights


# ---------------------------------------------------------------- data and results files


@pytest.fixture
def sample_spec(tmp_path):
    """The first `rows` rows of the bundled sample as a dataset of their own (duplicates, null and empty prompts included)."""
    from tasks.config import DatasetSpec

    def make(rows: int, name: str = "slice", **fields) -> DatasetSpec:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pq.read_table(SAMPLE_PARQUET).slice(0, rows), path)
        return DatasetSpec(**{"name": name, "source": str(path), "id_column": "id", "prompt_column": "prompt", **fields})

    return make


@pytest.fixture
def store(tmp_path):
    """A results file and result storage of the test's own (the file does not exist yet)."""
    from tasks.config import StoreConfig

    return StoreConfig(duckdb_path=str(tmp_path / "results.duckdb"), storage=str(tmp_path / "storage"))


def results_file(target) -> str:
    """A StoreConfig's results file, or a path."""
    return str(getattr(target, "duckdb_path", target))


@pytest.fixture(scope="session")
def query():
    """Rows of a query on a results file (a StoreConfig or a path), read-only."""

    def rows(target, sql: str, params=()) -> list[tuple]:
        with duckdb.connect(results_file(target), read_only=True) as con:
            return con.execute(sql, list(params)).fetchall()

    return rows


@pytest.fixture(scope="session")
def snapshot():
    """Every row of every table (or of `tables`), sorted: equal snapshots mean nothing changed."""

    def rows_of(target, tables: list[str] | None = None, exclude: tuple[str, ...] = ()) -> dict:
        with duckdb.connect(results_file(target), read_only=True) as con:
            return table_rows(con, tables, exclude)

    return rows_of


def table_rows(con: duckdb.DuckDBPyConnection, tables: list[str] | None = None, exclude: tuple[str, ...] = ()) -> dict:
    if tables is None:
        found = con.execute("SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1")
        tables = [name for (name,) in found.fetchall()]
    snapshot = {}
    for table in tables:
        columns = [c for (c,) in con.execute(f"SELECT column_name FROM (DESCRIBE {table})").fetchall() if c not in exclude]
        snapshot[table] = sorted(map(repr, con.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()))
    return snapshot


@pytest.fixture
def rows():
    """Factories of the store's rows with plausible values; a test overrides only what it is about."""
    from tasks.store.rows import DatasetVersionRow, RunRow, RunShardRow

    class Rows:
        @staticmethod
        def run(**fields) -> RunRow:
            values = dict(
                run_id="r1",
                dataset_version="dv1",
                dataset_name="t",
                model="m",
                model_fingerprint="fp",
                engine="vllm",
                engine_args="{}",
                sampling_params="{}",
                sampling_hash="sh",
                template_hash="th",
                scorers="x",
                code_version="0",
                started_at="2026-01-01T00:00:00+00:00",
                finished_at="2026-01-01T00:01:00+00:00",
                wall_seconds=60.0,
                rows_read=3,
                rejected=0,
                requests=3,
                unique_requests=2,
                duplicates=1,
                shards=1,
                cached_shards=0,
                engine_requests=1,
                outputs=2,
                errors=1,
                prompt_tokens=3,
                completion_tokens=4,
                generated_tokens=4,
                tokens_per_second=0.1,
            )
            return RunRow(**{**values, **fields})

        @staticmethod
        def dataset(**fields) -> DatasetVersionRow:
            values = dict(
                dataset_version="dv1",
                dataset_name="t",
                source="f",
                spec="{}",
                template_hash="th",
                rows_read=3,
                requests=3,
                unique_requests=2,
                rejected=0,
            )
            return DatasetVersionRow(**{**values, **fields})

        @staticmethod
        def shard(**fields) -> RunShardRow:
            values = dict(
                run_id="r1",
                shard_key="s1",
                output_key="o1",
                requests=2,
                errors=1,
                prompt_tokens=3,
                completion_tokens=4,
                generate_seconds=1.0,
                cached=False,
            )
            return RunShardRow(**{**values, **fields})

    return Rows


@pytest.fixture
def commit_inputs(tmp_path, rows):
    """One small run's record: three requests (one a duplicate), one answer and one error row, their scores."""
    from tasks import storage
    from tasks.engines.base import OutputRecord, output_table
    from tasks.scoring.registry import resolve_scorers, score_outputs
    from tasks.store.commit import CommitFiles, RunRecord

    requests = pa.table(
        {
            "custom_id": ["a", "b", "c"],
            "request_key": ["k1", "k2", "k1"],
            "prompt": ["p1", "p2", "p1"],
            "messages": [None, None, None],
            "overrides": pa.array([None, None, None], pa.string()),
            "source_file": ["f"] * 3,
            "source_row": [0, 1, 2],
            "duplicate_of": [None, None, "a"],
            "reference": [None, "r2", None],
        }
    )
    outputs = output_table(
        [
            OutputRecord("k1", text="x", finish_reason="length", prompt_tokens=3, completion_tokens=4),
            OutputRecord.failed("k2", "context_length_exceeded", "long", prompt_tokens=999),
        ]
    )
    scores = score_outputs(outputs, resolve_scorers(["completion_tokens", "finish_reason", "empty_output"]))
    outputs = outputs.append_column("shard_key", pa.array(["s1", "s1"])).append_column("output_key", pa.array(["o1", "o1"]))
    paths = {name: str(tmp_path / f"{name}.parquet") for name in ("requests", "outputs", "scores")}
    storage.write_parquet(requests, paths["requests"])
    storage.write_parquet(outputs, paths["outputs"])
    storage.write_parquet(scores, paths["scores"])
    files = CommitFiles(requests=[paths["requests"]], rejected=[], outputs=[paths["outputs"]], scores=[paths["scores"]])
    return RunRecord(rows.run(), rows.dataset(), [rows.shard()], files)


@pytest.fixture
def committed_store(store, commit_inputs):
    """A results file holding the commit_inputs run."""
    from tasks.store.commit import commit_run
    from tasks.store.connection import writing

    with writing(store.duckdb_path) as con:
        commit_run(con, commit_inputs)
    return store


@pytest.fixture
def reference_slice(tmp_path):
    """The first 40 rows of the bundled sample (with duplicates) plus a reference answer per row, one
    null prompt and one prompt longer than the tiny model's context (both rejected rows)."""
    from tasks.config import DatasetSpec

    table = pq.read_table(SAMPLE_PARQUET).slice(0, 40)
    prompts = table["prompt"].to_pylist()
    prompts[3], prompts[4] = None, " ".join(["photosynthesis"] * 400)
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string()))
    words = pc.utf8_split_whitespace(pc.fill_null(table["prompt"], ""))
    reference = pa.array([(w[-1] if w else None) for w in words.to_pylist()], pa.string())
    path = tmp_path / "slice.parquet"
    pq.write_table(table.append_column("answer", reference), path)
    return DatasetSpec(
        name="slice",
        source=str(path),
        id_column="id",
        prompt_column="prompt",
        reference_column="answer",
        system_prompt="Be brief.",
    )


# ---------------------------------------------------------------- processes

FLOW_PROCESS = """
import sys
from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, StoreConfig

if __name__ == "__main__":
    spec, model, sampling, sharding, store = (cls.model_validate_json(arg) for cls, arg in zip(
        (DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, StoreConfig), sys.argv[1:]))
    batch_inference(dataset=spec, model=model, sampling=sampling, sharding=sharding, store=store)
"""


@pytest.fixture
def start_flow_process(tmp_path):
    """Start batch_inference in its own process (own Prefect, own engine), in its own process group."""
    script = tmp_path / "run_flow.py"
    script.write_text(FLOW_PROCESS)

    def start(name: str, *configs) -> subprocess.Popen:
        environment = {
            **os.environ,
            "PREFECT_HOME": str(tmp_path / f"prefect-{name}"),
            "PREFECT_API_URL": "",
            # its temporary server builds a new database while the suite's engine loads the CPU
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        return subprocess.Popen(
            [sys.executable, str(script), *(config.model_dump_json() for config in configs)],
            start_new_session=True,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"{name}.log", "w"),
        )

    return start


@pytest.fixture(scope="session")
def sample_parquet() -> Path:
    """The bundled sample (2,400 rows), read-only."""
    return SAMPLE_PARQUET


# ---------------------------------------------------------------- user scorers


@pytest.fixture
def install_scorers(tmp_path, monkeypatch):
    """Install a package of user scorers the way pip does: a module plus a dist-info folder whose
    entry_points.txt registers them (group vllm_batch_flows.scorers), on sys.path."""

    installed = []

    def install(module: str, source: str, entries: dict[str, str]) -> None:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        dist_info = tmp_path / f"{module}-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        lines = [f"{name} = {value}" for name, value in entries.items()]
        (dist_info / "entry_points.txt").write_text("[vllm_batch_flows.scorers]\n" + "\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        installed.append(module)

    yield install
    for module in installed:
        sys.modules.pop(module, None)


# ---------------------------------------------------------------- object storage


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1, and the standard AWS variables that point s3fs
    (botocore) at it: the endpoint and credentials a user sets for their own object store. Returns the
    variables, for processes the test starts."""
    import logging

    from moto.server import ThreadedMotoServer

    from tasks.cluster import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the S3 server, as an s3:// URL."""
    import re
    import uuid

    import fsspec

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


# ---------------------------------------------------------------- a faulty OpenAI-compatible server

TOO_LONG = "question 7"  # the faulty server's 400: the request's own fault, a permanent answer
RIGHT_KEY = "sk-right"


class FaultyServer:
    """An OpenAI-compatible server whose faults the test sets per prompt: 503, 429, close, or none."""

    def __init__(self, faults: dict[str, str], auth_on_models: bool = True, answer_seconds: float = 0.0):
        self.faults = dict(faults)
        self.asked: Counter = Counter()  # POSTs per prompt
        self.models_asked = 0
        self.in_flight = self.most_in_flight = 0  # requests being answered at once, and the most seen
        self.in_flight_lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {RIGHT_KEY}":
                    return True
                self.reply(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
                return False

            def do_GET(self):
                server.models_asked += 1
                if auth_on_models and not self.authorized():
                    return
                card = {"id": "fake", "object": "model", "created": int(time.time()), "owned_by": "test", "root": "/m/fake"}
                self.reply(200, {"object": "list", "data": [card]})

            def do_POST(self):
                with server.in_flight_lock:
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    time.sleep(answer_seconds)
                    self.answer()
                finally:
                    with server.in_flight_lock:
                        server.in_flight -= 1

            def answer(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                server.asked[prompt] += 1
                if not self.authorized():
                    return
                fault = server.faults.get(prompt)
                if fault == "503":
                    self.reply(503, {"error": {"message": "overloaded"}})
                elif fault == "429":
                    self.reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                elif fault == "close":
                    self.close_connection = True  # no answer at all: the client sees the connection drop
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif prompt == TOO_LONG:
                    self.reply(400, {"error": {"message": "context length exceeded"}})
                else:
                    answer = {"index": 0, "message": {"role": "assistant", "content": f"echo {prompt}"}, "finish_reason": "stop"}
                    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
                    self.reply(200, {"id": "x", "object": "chat.completion", "choices": [answer], "usage": usage})

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def faulty_server():
    """Start FaultyServer(faults, **options) on 127.0.0.1; every one started is closed after the test."""
    servers = []

    def start(faults: dict[str, str] | None = None, **options):
        servers.append(FaultyServer(faults or {}, **options))
        return servers[-1]

    start.right_key, start.too_long = RIGHT_KEY, TOO_LONG
    yield start
    for server in servers:
        server.close()
