"""Only answers are answers: the openai engine against a real, faulty HTTP server started by the test.

The server is a small OpenAI-shaped app on 127.0.0.1 (the server is what is faulty here, not our code):
it answers 503, 429 with Retry-After, or closes the connection for the prompts it is told to, and 400
for a prompt that is the request's own fault. A wrong key gets 401; a closed port stands for a server
that is down.
"""

import socket
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, SpecError

PROMPTS = [f"question {i}" for i in range(8)]


@pytest.fixture
def dataset(tmp_path) -> DatasetSpec:
    path = tmp_path / "questions.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS}), path)
    return DatasetSpec(name="questions", source=str(path), id_column="id", prompt_column="prompt")


@pytest.fixture
def secret(prefect_harness):
    from prefect.blocks.system import Secret

    def save(value: str) -> str:
        Secret(value=value).save("faulty-server-key", overwrite=True)
        return "faulty-server-key"

    return save


def run(dataset, url, secret_name, store):
    model = ModelConfig(model="fake", engine="openai", base_url=url, api_key_secret=secret_name, max_retries=1)
    # one request per shard: a shard whose every request failed has the same key on the re-run
    sharding = ShardingConfig(shard_size=1, retries=0)
    return batch_inference(dataset=dataset, model=model, sampling=SamplingConfig(max_tokens=4), sharding=sharding, store=store)


def test_transient_errors_are_recorded_and_asked_again_once_the_server_heals(dataset, secret, store, query, faulty_server):
    faults = {"question 1": "503", "question 3": "429", "question 5": "close"}
    server = faulty_server(faults)
    try:
        first = run(dataset, server.url, secret(faulty_server.right_key), store)
        assert first.errors == 4
        assert query(store, "SELECT custom_id, error_code FROM run_outputs WHERE error_code IS NOT NULL ORDER BY 1") == [
            ("q1", "http_503"),
            ("q3", "http_429"),
            ("q5", "connection_error"),
            ("q7", "http_400"),
        ]
        assert all(server.asked[prompt] == 2 for prompt in faults)  # the first try and the one retry

        server.faults.clear()  # healed
        server.asked.clear()
        second = run(dataset, server.url, secret(faulty_server.right_key), store)
    finally:
        server.close()
    # exactly the transient failures are asked again; answers and the permanent error are reused
    assert server.asked == Counter(dict.fromkeys(faults, 1))
    # the first run recorded which errors were transient (its shards, its summary)
    assert first.transient_errors == 3
    assert query(store, "SELECT sum(transient_errors) FROM run_shards WHERE run_id = ?", [first.run_id]) == [(3,)]
    assert (second.engine_requests, second.reused_requests, second.errors, second.transient_errors) == (3, 5, 0, 0)
    second_outputs = query(
        store, "SELECT custom_id, text, error_kind FROM run_outputs WHERE run_id = ? ORDER BY 1", [second.run_id]
    )
    assert second_outputs == [
        (f"q{i}", None, "permanent") if f"question {i}" == faulty_server.too_long else (f"q{i}", f"echo question {i}", None)
        for i in range(len(PROMPTS))
    ]
    # the answers took the transient errors' places: one row per request, none transient left
    assert query(store, "SELECT count(*), count(DISTINCT request_key) FROM outputs") == [(8, 8)]
    assert query(store, "SELECT count(*) FROM outputs WHERE error_kind = 'transient'") == [(0,)]
    assert query(store, "SELECT count(DISTINCT o.custom_id) FROM scores s JOIN outputs o USING (output_id)") == [(7,)]


@pytest.mark.parametrize("auth_on_models", [True, False], ids=["refused-at-models", "refused-at-completions"])
def test_a_wrong_key_fails_the_run_with_the_server_and_status_and_stores_nothing(
    dataset, secret, store, auth_on_models, query, faulty_server
):
    server = faulty_server({}, auth_on_models=auth_on_models)
    try:
        with pytest.raises(SpecError) as raised:
            run(dataset, server.url, secret("sk-wrong"), store)
    finally:
        server.close()
    message = str(raised.value)
    assert server.url in message and "401" in message and "API key" in message
    assert max(server.asked.values(), default=0) <= 1  # a refusal is not retried
    # no error rows standing in for answers: a refusal before any work commits nothing, one during the
    # run leaves the run marked failed with no outputs
    if Path(store.duckdb_path).exists():
        assert query(store, "SELECT status, outputs FROM runs") == [("failed", 0)]
        assert query(store, "SELECT count(*) FROM outputs") == [(0,)]


def test_a_server_that_is_down_fails_the_run_at_once(dataset, secret, store, faulty_server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"  # nothing listens here once the probe closes
    started = time.monotonic()
    with pytest.raises(SpecError, match="cannot connect") as raised:
        run(dataset, url, secret(faulty_server.right_key), store)
    assert url in str(raised.value) and time.monotonic() - started < 60
    assert not Path(store.duckdb_path).exists()


def test_requests_in_flight_across_the_whole_run_never_exceed_max_concurrency(tmp_path, secret, store, faulty_server):
    server = faulty_server({}, answer_seconds=0.05)
    path = tmp_path / "many.parquet"
    prompts = [f"question {i}" for i in range(100, 160)]
    pq.write_table(pa.table({"id": [f"m{i}" for i in range(len(prompts))], "prompt": prompts}), path)
    dataset = DatasetSpec(name="many", source=str(path), id_column="id", prompt_column="prompt")
    model = ModelConfig(
        model="fake", engine="openai", base_url=server.url, api_key_secret=secret(faulty_server.right_key), max_concurrency=3
    )
    try:  # three shards in flight, two parts each: six generate calls at once share the server's three slots
        summary = batch_inference(
            dataset=dataset,
            model=model,
            sampling=SamplingConfig(max_tokens=4),
            sharding=ShardingConfig(shard_size=10, part_size=4, shards_in_flight=3),
            store=store,
        )
    finally:
        server.close()
    assert summary.outputs == len(prompts) and summary.errors == 0
    assert sum(server.asked.values()) == len(prompts)
    assert 1 < server.most_in_flight <= 3
