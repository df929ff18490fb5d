"""The openai engine against a real `vllm serve` of the tiny model, started on 127.0.0.1 by the test."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, ShardingConfig, SpecError, StoreConfig, StructuredOutput
from tasks.engines.openai import request_body

API_KEY = "sk-test-not-a-real-key-4242"


def test_request_body_sends_only_what_is_set():
    chat = request_body("m", None, json.dumps([{"role": "user", "content": "hi"}]), SamplingConfig(max_tokens=5))
    assert chat == {"model": "m", "max_tokens": 5, "temperature": 0.0, "messages": [{"role": "user", "content": "hi"}], "seed": 0}
    sampling = SamplingConfig(
        max_tokens=5, n=2, top_k=20, logprobs=1, stop=["\n"], structured=StructuredOutput(choice=["a", "b"])
    )
    completion = request_body("m", "Once", None, sampling)
    assert completion["prompt"] == "Once" and completion["n"] == 2 and completion["top_k"] == 20
    assert completion["logprobs"] == 1 and completion["stop"] == ["\n"]
    assert completion["structured_outputs"] == {"choice": ["a", "b"]}
    schema = request_body("m", "x", None, SamplingConfig(structured=StructuredOutput(json_schema={"type": "object"})))
    assert schema["response_format"]["json_schema"]["schema"] == {"type": "object"}
    json_object = request_body(
        "m", "x", None, SamplingConfig(structured=StructuredOutput(json_object=True), logit_bias={7: -100})
    )
    assert json_object["response_format"] == {"type": "json_object"} and json_object["logit_bias"] == {"7": -100.0}
    no_thinking = SamplingConfig(chat_template_kwargs={"enable_thinking": False})
    hi = json.dumps([{"role": "user", "content": "hi"}])
    assert request_body("m", None, hi, no_thinking)["chat_template_kwargs"] == {"enable_thinking": False}
    assert "chat_template_kwargs" not in request_body("m", "x", None, no_thinking)  # a prompt goes through no template


def test_vllms_own_sampling_fields_and_extra_go_in_the_body_as_extra_body_would_send_them():
    sampling = SamplingConfig(
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=[5],
        bad_words=["x"],
        skip_special_tokens=False,
        truncate_prompt_tokens=-1,
        extra={"include_stop_str_in_output": True},
        structured=StructuredOutput(grammar="root ::= 'a'"),
    )
    body = request_body("m", "x", None, sampling)
    assert {k: body[k] for k in ("min_tokens", "ignore_eos", "stop_token_ids", "bad_words", "skip_special_tokens")} == {
        "min_tokens": 2,
        "ignore_eos": True,
        "stop_token_ids": [5],
        "bad_words": ["x"],
        "skip_special_tokens": False,
    }
    assert body["truncate_prompt_tokens"] == -1 and body["include_stop_str_in_output"] is True
    assert body["structured_outputs"] == {"grammar": "root ::= 'a'"}
    assert "extra" not in body and "max_tokens_wins" not in body


def test_a_servers_reasoning_split_is_kept_with_its_token_counts():
    from tasks.engines.openai import choice_records

    def answer(message: dict, finish_reason: str) -> dict:
        usage = {"prompt_tokens": 3, "completion_tokens": 10, "completion_tokens_details": {"reasoning_tokens": 7}}
        return {"choices": [{"index": 0, "message": message, "finish_reason": finish_reason}], "usage": usage}

    (done,) = choice_records("k", answer({"content": "yes", "reasoning": "think"}, "stop"), 0.1, True, SamplingConfig(), True)
    assert (done.text, done.reasoning, done.reasoning_tokens, done.text_tokens, done.reasoning_truncated) == (
        "yes",
        "think",
        7,
        3,
        False,
    )
    (cut,) = choice_records(
        "k", answer({"content": None, "reasoning_content": "thi"}, "length"), 0.1, True, SamplingConfig(), True
    )
    assert (cut.text, cut.reasoning, cut.reasoning_truncated) == ("", "thi", True)
    (plain,) = choice_records("k", answer({"content": "yes", "reasoning": "think"}, "stop"), 0.1, True, SamplingConfig())
    assert plain.reasoning is None and plain.reasoning_truncated is None  # no parser asked: nothing split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tiny_thinking_model_dir, tmp_path_factory):
    """`vllm serve` of the tiny model with the same engine arguments as the in-process engine, and the
    tiny thinking model's chat template: the same prompts as the tiny model's own, unless a request's
    chat_template_kwargs turn thinking off."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        tiny_model.model,
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--max-model-len",
        str(tiny_model.max_model_len),
        "--gpu-memory-utilization",
        str(tiny_model.gpu_memory_utilization),
        "--seed",
        str(tiny_model.seed),
        "--enforce-eager",
        "--enable-lora",
        "--max-lora-rank",
        str(tiny_model.max_lora_rank),
        "--uvicorn-log-level",
        "warning",
        "--no-enable-chunked-prefill",  # as the in-process engine on CPU (tasks/engines/vllm.py)
        "--chat-template",
        str(tiny_thinking_model_dir / "chat_template.jinja"),
    ]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, f"vllm serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vllm serve did not come up:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


class FlakyProxy:
    """Forwards to the real server, but answers each request's first attempts with 429 and 503."""

    def __init__(self, upstream: str, failures=(429, 503)):
        self.attempts: Counter = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # the model card, asked once before the run: passed through as it is
                response = httpx.get(
                    upstream + self.path.removeprefix("/v1"),
                    timeout=120,
                    headers={"Authorization": self.headers.get("Authorization", "")},
                )
                self.send_response(response.status_code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(response.content)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                attempt = proxy.attempts[body]
                proxy.attempts[body] += 1
                if attempt < len(failures):
                    self.send_response(failures[attempt])
                    self.end_headers()
                    return
                response = httpx.post(
                    upstream + self.path.removeprefix("/v1"),
                    content=body,
                    timeout=120,
                    headers={"Authorization": self.headers.get("Authorization", ""), "Content-Type": "application/json"},
                )
                self.send_response(response.status_code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(response.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def api_key_secret(prefect_harness):
    from prefect.blocks.system import Secret

    Secret(value=API_KEY).save("tiny-vllm-key", overwrite=True)
    return "tiny-vllm-key"


def texts(store: StoreConfig) -> dict:
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        return dict(con.execute("SELECT custom_id, text FROM run_outputs WHERE error_code IS NULL").fetchall())


def openai_model(base_url: str, secret: str | None, **overrides) -> ModelConfig:
    return ModelConfig(
        model="tiny", engine="openai", base_url=base_url, api_key_secret=secret, max_concurrency=8, max_retries=3, **overrides
    )


@pytest.mark.slow
def test_greedy_outputs_over_http_equal_the_in_process_engine_despite_429_and_503(
    vllm_server, api_key_secret, tiny_model, tmp_path, sample_spec
):
    spec = sample_spec(60, system_prompt="Be brief.")
    sampling, sharding = SamplingConfig(max_tokens=8), ShardingConfig(shard_size=25)
    local = StoreConfig(duckdb_path=str(tmp_path / "local.duckdb"), storage=str(tmp_path / "local"))
    remote = StoreConfig(duckdb_path=str(tmp_path / "remote.duckdb"), storage=str(tmp_path / "remote"))
    proxy = FlakyProxy(vllm_server)
    try:
        in_process = batch_inference(dataset=spec, model=tiny_model, sampling=sampling, sharding=sharding, store=local)
        over_http = batch_inference(
            dataset=spec, model=openai_model(proxy.url, api_key_secret), sampling=sampling, sharding=sharding, store=remote
        )
    finally:
        proxy.close()
    assert over_http.errors == 0 and over_http.outputs == in_process.outputs == in_process.unique_requests
    assert set(proxy.attempts.values()) == {3}  # every request: 429, 503, then the real answer
    assert texts(remote) == texts(local)
    with duckdb.connect(remote.duckdb_path, read_only=True) as con:
        assert con.execute("SELECT engine FROM runs").fetchone() == ("openai",)
        dump = json.dumps(con.execute("SELECT * FROM runs").fetchall(), default=str)
        assert api_key_secret in dump and API_KEY not in dump  # the secret's name, never its value


@pytest.mark.slow
def test_request_errors_become_error_rows_and_the_run_goes_on(vllm_server, api_key_secret, tmp_path):
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"id": ["short", "long"], "prompt": ["Name a color.", "word " * 400]}), path)
    spec = DatasetSpec(name="mixed", source=str(path), id_column="id", prompt_column="prompt")
    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "s"))
    summary = batch_inference(
        dataset=spec, model=openai_model(vllm_server, api_key_secret), sampling=SamplingConfig(max_tokens=4), store=store
    )
    assert (summary.outputs, summary.errors) == (2, 1)
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        rows = dict(con.execute("SELECT custom_id, error_code FROM run_outputs").fetchall())
    assert rows == {"short": None, "long": "http_400"}

    wrong_key = StoreConfig(duckdb_path=str(tmp_path / "w.duckdb"), storage=str(tmp_path / "w"))
    with pytest.raises(SpecError, match="answered 401"):  # no key: the run fails, no error rows stand in for answers
        batch_inference(
            dataset=spec, model=openai_model(vllm_server, None), sampling=SamplingConfig(max_tokens=4), store=wrong_key
        )
    assert not Path(wrong_key.duckdb_path).exists()


@pytest.mark.slow
def test_chat_template_kwargs_reach_the_servers_chat_template(
    vllm_server, api_key_secret, tiny_model_dir, tiny_thinking_model_dir, tmp_path, query
):
    from transformers import AutoTokenizer

    questions = {"a": "Why is the sky blue?", "b": "Name a fruit."}
    pq.write_table(pa.table({"id": list(questions), "prompt": list(questions.values())}), tmp_path / "q.parquet")
    spec = DatasetSpec(name="switch", source=str(tmp_path / "q.parquet"), id_column="id", prompt_column="prompt")
    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "s"))
    prompt_tokens = {}
    for switch in (None, False):
        sampling = SamplingConfig(max_tokens=2, chat_template_kwargs=None if switch is None else {"enable_thinking": switch})
        run = batch_inference(dataset=spec, model=openai_model(vllm_server, api_key_secret), sampling=sampling, store=store)
        assert (run.errors, run.engine_requests) == (0, 2)  # each setting its own key: nothing answered from the other
        found = query(store, "SELECT custom_id, prompt_tokens FROM run_outputs WHERE run_id = ?", [run.run_id])
        prompt_tokens[switch] = dict(found)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    thinking = (tiny_thinking_model_dir / "chat_template.jinja").read_text()
    for custom_id, question in questions.items():
        messages = [{"role": "user", "content": question}]
        own = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        off = tokenizer.apply_chat_template(
            messages, chat_template=thinking, add_generation_prompt=True, return_dict=False, enable_thinking=False
        )
        assert len(off) > len(own)
        assert (prompt_tokens[None][custom_id], prompt_tokens[False][custom_id]) == (len(own), len(off))


def test_a_servers_logprobs_become_token_logprobs_chat_completions_and_prompt():
    from tasks.engines.openai import choice_records

    top = [{"token": " a", "logprob": -0.5, "bytes": [32, 97]}, {"token": " b", "logprob": -1.0, "bytes": [32, 98]}]
    chat = {
        "choices": [
            {
                "index": 0,
                "message": {"content": " a b"},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [{"token": " a", "logprob": -0.5, "top_logprobs": top}, {"token": " b", "logprob": -1.5}]
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        # vLLM's extension: per prompt place, token id -> logprob, rank, text; the first place has nothing before it
        "prompt_logprobs": [None, {"9": {"logprob": -2.0, "rank": 3, "decoded_token": "x"}, "4": {"logprob": -0.1, "rank": 1}}],
    }
    (record,) = choice_records("k", chat, 0.1, True, SamplingConfig(logprobs=2, prompt_logprobs=1))
    assert [(t["token"], t["logprob"], len(t["top"])) for t in record.token_logprobs] == [(" a", -0.5, 2), (" b", -1.5, 0)]
    assert record.mean_logprob == -1.0
    assert record.prompt_logprobs[0]["logprob"] is None
    assert record.prompt_logprobs[1] == {
        "token": "x",
        "token_id": 9,
        "logprob": -2.0,
        "top": [{"token": None, "token_id": 4, "logprob": -0.1}],
    }

    completion = {
        "choices": [
            {
                "index": 0,
                "text": " a!",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": [" a", "!"],
                    "token_logprobs": [-0.5, -3.0],
                    "top_logprobs": [{" a": -0.5, " b": -1.0}, {"!": -3.0, ".": -0.2, "?": -0.9}],
                    "text_offset": [0, 2],
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    (record,) = choice_records("k", completion, 0.1, False, SamplingConfig(logprobs=2))
    # each place's map holds the chosen token too: the top two by logprob are kept
    assert [[a["token"] for a in t["top"]] for t in record.token_logprobs] == [[" a", " b"], [".", "?"]]
    assert record.prompt_logprobs is None
    (plain,) = choice_records("k", completion, 0.1, False, SamplingConfig())
    assert plain.token_logprobs is None and plain.mean_logprob is None  # not asked: nothing kept


@pytest.mark.slow
def test_vllms_own_sampling_fields_over_http_give_the_in_process_engines_answers(
    vllm_server, api_key_secret, tiny_model, tmp_path, sample_spec, query
):
    spec = sample_spec(8, system_prompt="Be brief.")
    sampling = SamplingConfig(
        max_tokens=8,
        stop=[" "],
        min_tokens=3,
        ignore_eos=True,
        bad_words=["Classi"],
        skip_special_tokens=False,
        truncate_prompt_tokens=12,
        extra={"include_stop_str_in_output": True},
    )
    local = StoreConfig(duckdb_path=str(tmp_path / "local.duckdb"), storage=str(tmp_path / "local"))
    remote = StoreConfig(duckdb_path=str(tmp_path / "remote.duckdb"), storage=str(tmp_path / "remote"))
    batch_inference(dataset=spec, model=tiny_model, sampling=sampling, store=local)
    over_http = batch_inference(dataset=spec, model=openai_model(vllm_server, api_key_secret), sampling=sampling, store=remote)
    assert over_http.errors == 0
    assert texts(remote) == texts(local)
    assert query(remote, "SELECT DISTINCT prompt_tokens FROM run_outputs") == [(12,)]  # truncated by the server
    assert any(text.endswith(" ") for text in texts(local).values())  # the stop string kept in the text


@pytest.mark.slow
def test_a_judge_served_by_vllm_serve_and_named_by_a_saved_block_is_sent_its_constraint_and_every_verdict_parses(
    vllm_server, api_key_secret, sample_spec, tmp_path, query
):
    from blocks.model import InferenceModel
    from flows.judge_runs import judge_runs
    from tasks.scoring.judge import LABELS, JudgeConfig, verdict_constraint

    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "s"))
    dataset = sample_spec(12, reference_column="category")  # 11 unique requests; the category as a reference answer
    settings = [SamplingConfig(max_tokens=8), SamplingConfig(temperature=1.0, seed=7, max_tokens=8)]
    served = openai_model(vllm_server, api_key_secret)
    run_a, run_b = (batch_inference(dataset=dataset, model=served, sampling=s, store=store, scorers=[]).run_id for s in settings)
    proxy = FlakyProxy(vllm_server, failures=())  # passes every request on, and keeps the bodies the server was sent
    InferenceModel(config=openai_model(proxy.url, api_key_secret)).save("served-judge", overwrite=True)
    try:
        pairwise = judge_runs(run_a=run_a, run_b=run_b, judge=JudgeConfig(model="served-judge"), store=store).judgement
        json_judge = JudgeConfig(model="served-judge", verdict="json")
        reference = judge_runs(run_a=run_a, reference=True, judge=json_judge, store=store).judgement
    finally:
        proxy.close()

    # the block's model judged, over HTTP; every request the server got carried its verdict's constraint
    judge_run_ids = [pairwise.judge_run_id, reference.judge_run_id]
    assert (pairwise.judge_model, reference.judge_model) == ("tiny", "tiny")
    assert query(store, "SELECT DISTINCT engine FROM runs WHERE run_id IN (?, ?)", judge_run_ids) == [("openai",)]
    sent = [json.loads(body) for body in proxy.attempts]
    assert sum(proxy.attempts.values()) == len(sent)  # each request once: nothing failed, nothing retried
    engine_requests = dict(query(store, "SELECT run_id, engine_requests FROM runs WHERE run_id IN (?, ?)", judge_run_ids))
    choice, regex = {"choice": LABELS["pairwise"]}, {"regex": verdict_constraint("pairwise", "json").regex}
    assert Counter(json.dumps(body.get("structured_outputs")) for body in sent) == {
        json.dumps(choice): engine_requests[pairwise.judge_run_id],
        json.dumps(regex): engine_requests[reference.judge_run_id],
    }
    assert all("messages" in body for body in sent) and min(engine_requests.values()) > 0

    for judgement in (pairwise, reference):
        verdicts = query(
            store,
            "SELECT custom_id, sample_index, position, verdict, winner, reason, error FROM judge_verdicts WHERE judgement_id = ?",
            [judgement.judgement_id],
        )
        # constrained output: 11 pairs in both orders, every verdict a label (json: with its reason)
        assert len(verdicts) == 22 and {v[6] for v in verdicts} == {None} and {v[3] for v in verdicts} <= {"A", "B", "tie"}
        assert all(isinstance(v[5], str) for v in verdicts) == (judgement is reference)
        # the judgement's numbers are what its verdict rows add up to: a pair is a run's when both orders name it
        pairs: dict = {}
        for custom_id, sample_index, position, _, winner, _, _ in verdicts:
            pairs.setdefault((custom_id, sample_index), {})[position] = winner
        outcomes = [p["ab"] if p["ab"] == p["ba"] else "tie" for p in pairs.values()]
        (stored,) = query(
            store,
            "SELECT pairs, a_wins, b_wins, ties, inconsistent, unparseable, win_rate FROM judgements WHERE judgement_id = ?",
            [judgement.judgement_id],
        )
        a, b, ties = outcomes.count("a"), outcomes.count("b"), outcomes.count("tie")
        inconsistent = sum(p["ab"] != p["ba"] for p in pairs.values())
        assert stored == (11, a, b, ties, inconsistent, 0, pytest.approx((a + ties / 2) / 11))
