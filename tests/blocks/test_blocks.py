"""Blocks: registered by one command, named instead of a configuration, secrets kept out of every record."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL

from blocks import resolve
from blocks.label_studio import LabelStudio
from blocks.model import InferenceModel
from blocks.store import ResultsStore
from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, StoreConfig

REPO = Path(__file__).resolve().parents[2]


def test_one_command_registers_every_block_type(prefect_harness):
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "block", "register", "-m", "blocks"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with get_client(sync_client=True) as client:
        slugs = {block_type.slug for block_type in client.read_block_types()}
    assert {"inference-model", "results-store"} <= slugs


def test_a_block_name_stands_for_its_configuration(prefect_harness, tmp_path):
    model = ModelConfig(model="/models/llama", max_model_len=4096, gpu_memory_utilization=0.8)
    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "s"))
    InferenceModel(config=model).save("llama-test", overwrite=True)
    ResultsStore(config=store).save("store-test", overwrite=True)
    assert resolve("llama-test", InferenceModel) == model and resolve(model, InferenceModel) is model
    assert resolve("store-test", ResultsStore) == store and resolve(store, ResultsStore) is store
    LabelStudio(url="http://ls:8080/", api_key="k").save("ls-test", overwrite=True)
    assert resolve("ls-test", LabelStudio).url == "http://ls:8080"  # a block without a config is itself the value
    with pytest.raises(ValueError, match="no-such-block"):
        resolve("no-such-block", InferenceModel)


@pytest.mark.slow
def test_secrets_stay_out_of_logs_artifacts_parameters_and_duckdb(prefect_harness, tmp_path, sample_parquet, faulty_server):
    """The openai engine's key lives in a Secret block; a run that uses it records only the name."""
    api_key = faulty_server.right_key
    Secret(value=api_key).save("endpoint-key", overwrite=True)
    server = faulty_server()  # answers only requests that carry the key
    endpoint = ModelConfig(model="fake", engine="openai", base_url=server.url, api_key_secret="endpoint-key", max_retries=0)
    InferenceModel(config=endpoint).save("endpoint-model", overwrite=True)
    ResultsStore(config=StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "s"))).save(
        "secret-test-store", overwrite=True
    )
    data = tmp_path / "ten.parquet"
    pq.write_table(pq.read_table(sample_parquet).slice(0, 10), data)
    dataset = DatasetSpec(name="ten", source=str(data), id_column="id", prompt_column="prompt")

    state = batch_inference(
        dataset=dataset,
        model="endpoint-model",
        store="secret-test-store",
        sampling=SamplingConfig(max_tokens=4),
        return_state=True,
    )
    summary = state.result()
    assert summary.outputs == sum(server.asked.values()) > 0 and summary.errors == 0  # the key was read and used

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = [a for a in client.read_artifacts() if a.flow_run_id == run_id]
    assert logs and {"batch-inference-summary", "batch-inference-report"} <= {a.key for a in artifacts}
    records = {
        "logs": "\n".join(log.message for log in logs),
        "artifacts": json.dumps([a.data for a in artifacts], default=str),
        "parameters": json.dumps(flow_run.parameters, default=str),
    }
    with duckdb.connect(str(tmp_path / "r.duckdb"), read_only=True) as con:
        tables = [row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        records["duckdb"] = json.dumps([con.execute(f"SELECT * FROM {t}").fetchall() for t in tables], default=str)
    assert "endpoint-key" in records["duckdb"] and "endpoint-model" in records["parameters"]  # names only
    leaked = [where for where, text in records.items() if api_key in text]
    assert not leaked, f"the API key appears in {leaked}"
