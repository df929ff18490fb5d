"""Credentials given in a URL or among the engine arguments are used, and never stored or logged:
not in the results file, not in the result storage, not in the flow run's parameters, logs or artifacts."""

import base64
import http.server
import json
import threading
from pathlib import Path

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, SamplingConfig, ShardingConfig

pytestmark = pytest.mark.slow

PASSWORD = "s3cret"
LINES = [{"id": i, "prompt": f"Name a colour, number {i}."} for i in range(12)]


@pytest.fixture
def private_server(tmp_path):
    """An HTTP server that serves prompts.jsonl (one line of it broken) to user:s3cret only."""
    (tmp_path / "served").mkdir()
    lines = [json.dumps(line) for line in LINES] + ["{not json"]
    (tmp_path / "served" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()

    class Private(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def send_head(self):
            if self.headers.get("Authorization") != expected:
                self.send_error(401)
                return None
            return super().send_head()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Private)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}/prompts.jsonl"
    server.shutdown()


def run_and_records(spec: DatasetSpec, model, store, snapshot) -> tuple:
    state = batch_inference(
        dataset=spec,
        model=model,
        sampling=SamplingConfig(max_tokens=4),
        sharding=ShardingConfig(shard_size=8),
        store=store,
        return_state=True,
    )
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    prefect = {
        "parameters": json.dumps(flow_run.parameters),
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(f"{artifact.description} {artifact.data}" for artifact in artifacts),
    }
    results = str(snapshot(store)) if Path(store.duckdb_path).exists() else ""
    stored = {str(path): path.read_bytes() for path in Path(store.storage).rglob("*") if path.is_file()}
    return state, prefect, results, stored


def assert_nowhere(prefect: dict, results: str, stored: dict) -> None:
    for where, text in prefect.items():
        assert PASSWORD not in text, f"flow run {where}"
    assert PASSWORD not in results, "results file"
    assert not [path for path, data in stored.items() if PASSWORD.encode() in data], "result storage"


@pytest.mark.replaces_engine  # hf_token is an engine argument: another engine
def test_credentials_in_urls_and_engine_kwargs_are_used_but_never_recorded(
    prefect_harness, tiny_model, private_server, store, snapshot, query
):
    spec = DatasetSpec(name="private", source=f"http://user:{PASSWORD}@{private_server}", id_column="id", prompt_column="prompt")
    model = tiny_model.model_copy(
        update={"base_url": f"https://user:{PASSWORD}@judge.internal/v1", "engine_kwargs": {"hf_token": PASSWORD}}
    )

    state, prefect, results, stored = run_and_records(spec, model, store, snapshot)

    summary = state.result()
    assert (summary.rows_read, summary.rejected) == (len(LINES) + 1, 1)  # the credentials opened the file
    assert query(store, "SELECT DISTINCT source_file FROM requests") == [(f"http://***@{private_server}",)]
    assert query(store, "SELECT source FROM dataset_versions") == [(f"http://***@{private_server}",)]
    assert json.loads(query(store, "SELECT engine_args FROM runs")[0][0])["engine_kwargs"] == {"hf_token": "***"}
    assert_nowhere(prefect, results, stored)


def test_a_source_url_from_a_secret_block_is_read_and_only_its_name_recorded(
    prefect_harness, tiny_model, private_server, store, snapshot, query
):
    Secret(value=f"http://user:{PASSWORD}@{private_server}").save("private-prompts", overwrite=True)
    spec = DatasetSpec(
        name="private",
        source=f"http://{private_server}",
        source_secret="private-prompts",
        id_column="id",
        prompt_column="prompt",
    )

    state, prefect, results, stored = run_and_records(spec, tiny_model, store, snapshot)

    assert state.result().rows_read == len(LINES) + 1
    assert query(store, "SELECT source FROM dataset_versions") == [(f"http://{private_server}",)]
    assert_nowhere(prefect, results, stored)


def test_a_wrong_password_fails_clearly_without_logging_it(prefect_harness, tiny_model, private_server, store, snapshot):
    spec = DatasetSpec(name="private", source=f"http://user:{PASSWORD}x@{private_server}", id_column="id", prompt_column="prompt")

    state, prefect, results, stored = run_and_records(spec, tiny_model, store, snapshot)

    assert state.is_failed()
    with pytest.raises(Exception, match=r"401.*Unauthorized.*http://127.0.0.1:\d+/prompts.jsonl"):
        state.result()
    assert_nowhere(prefect, results, stored)
