"""The `vbf` command: `vbf run` on a spec (and `python -m flows`, its alias) and on a plain data file with
flags, a re-run that starts no engine, one clear line for a bad input, and `vbf sql` on the results."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
VBF = str(Path(sys.executable).parent / "vbf")  # the console script pip installed beside this Python
ENGINE_START = "Initializing a V1 LLM engine"  # vLLM's engine process logs this as it starts
TINY_ENGINE = ["--max-model-len", "1024", "--gpu-memory-utilization", "0.15", "--enforce-eager"]


def vbf(tmp_path: Path, *args: str, command: tuple[str, ...] = (VBF,), check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def engine_log(completed: subprocess.CompletedProcess) -> str:
    """What a quiet `vbf` run sent to its log file (the path it prints at the end), and its terminal output."""
    found = re.search(r"engine and library output: (\S+)", completed.stdout)
    return (Path(found[1]).read_text() if found else "") + completed.stdout + completed.stderr


def store_flags(tmp_path: Path) -> list[str]:
    return ["--duckdb", str(tmp_path / "results.duckdb"), "--storage", str(tmp_path / "storage")]


@pytest.mark.slow
def test_vbf_run_answers_a_spec_and_a_rerun_through_the_alias_never_starts_the_engine(tmp_path, tiny_model_dir, sample_parquet):
    pq.write_table(pq.read_table(sample_parquet).slice(0, 12), tmp_path / "prompts.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: cli\nsource: prompts.parquet\nid_column: id\nprompt_column: prompt\n")
    args = ["--spec", str(spec), "--model", str(tiny_model_dir), *TINY_ENGINE, "--max-tokens", "4", *store_flags(tmp_path)]

    first = vbf(tmp_path, "run", *args, "--summary-json", str(tmp_path / "first.json"))
    summary = json.loads((tmp_path / "first.json").read_text())
    assert summary["engine_requests"] == summary["unique_requests"] > 0
    assert ENGINE_START in engine_log(first) and f"run {summary['run_id']}" in first.stdout  # the summary is printed
    assert "vbf sql --duckdb" in first.stdout  # and what to try next
    # A quiet console: the engine's and the libraries' lines are in the log file, not on the terminal.
    terminal = first.stdout + first.stderr
    assert not [line for line in terminal.splitlines() if re.search(r"INFO \d\d-\d\d|Warning|Task run '", line)], terminal
    assert len(terminal.splitlines()) <= 40, terminal

    second = vbf(tmp_path, *args, "--summary-json", str(tmp_path / "second.json"), command=(sys.executable, "-m", "flows"))
    again = json.loads((tmp_path / "second.json").read_text())
    assert again["engine_requests"] == 0 and again["reused_requests"] == summary["unique_requests"]
    assert ENGINE_START not in engine_log(second)  # the results file already answers this input: no engine

    table = vbf(
        tmp_path,
        "sql",
        "SELECT count(*) AS runs, sum(engine_requests) AS sent FROM runs",
        "--duckdb",
        str(tmp_path / "results.duckdb"),
    )
    assert table.stdout.split() == ["runs", "sent", "2", str(summary["unique_requests"])]


@pytest.mark.slow
def test_vbf_run_takes_a_plain_file_with_its_columns_and_the_sampling_and_sharding_flags(
    tmp_path, tiny_thinking_model_dir, query
):
    from transformers import AutoTokenizer

    questions = [f"Question number {i}?" for i in range(7)]
    data = tmp_path / "questions.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(7)], "question": questions}), data)
    flags = ["--prompt-column", "question", "--id-column", "key", "--temperature", "0.7", "--seed", "3", "--n", "2"]
    flags += ["--chat-template-kwargs", '{"enable_thinking": false}']  # the thinking model's template reads it
    verbose = vbf(
        tmp_path,
        "run",
        str(data),
        *flags,
        "--max-tokens",
        "3",
        "--shard-size",
        "3",
        "--model",
        str(tiny_thinking_model_dir),
        *TINY_ENGINE,
        *store_flags(tmp_path),
        "--verbose",
    )
    assert ENGINE_START in verbose.stdout + verbose.stderr and "engine and library output" not in verbose.stdout

    (run,) = query(tmp_path / "results.duckdb", "SELECT dataset_name, shards, outputs, sampling_params FROM runs")
    sampling = json.loads(run[3])
    assert run[:3] == ("questions", 3, 14)  # 7 requests in shards of 3, two samples each
    assert (sampling["temperature"], sampling["seed"], sampling["n"], sampling["max_tokens"]) == (0.7, 3, 2, 3)
    assert sampling["chat_template_kwargs"] == {"enable_thinking": False}
    assert query(tmp_path / "results.duckdb", "SELECT count(DISTINCT custom_id), max(completion_tokens) FROM run_outputs") == [
        (7, 3)
    ]
    # the engine got the prompts its template renders with thinking off: each closed with an empty thinking
    tokenizer = AutoTokenizer.from_pretrained(tiny_thinking_model_dir)
    expected = {}
    for i, question in enumerate(questions):
        messages = [{"role": "user", "content": question}]
        off = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, enable_thinking=False)
        assert len(off) > len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        expected[f"k{i}"] = len(off)
    found = query(tmp_path / "results.duckdb", "SELECT DISTINCT custom_id, prompt_tokens FROM run_outputs")
    assert dict(found) == expected


@pytest.mark.slow
def test_a_bad_input_prints_one_line_naming_the_file_and_verbose_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("id,prompt\n1,hi\n")
    quiet = vbf(tmp_path, "run", str(bad), "--prompt-column", "prompt", *store_flags(tmp_path), check=False)
    assert quiet.returncode == 1
    assert f"vbf run: error: dataset file {bad}: not a readable Parquet file" in quiet.stderr
    # no traceback of the error (Prefect may still log its own hiccups), and no engine for a bad input
    assert f'File "{ROOT / "tasks"}' not in quiet.stdout + quiet.stderr
    assert ENGINE_START not in quiet.stderr
    assert not (tmp_path / "results.duckdb").exists()

    verbose = vbf(tmp_path, "run", str(bad), "--prompt-column", "prompt", "--verbose", *store_flags(tmp_path), check=False)
    assert verbose.returncode == 1 and f'File "{ROOT / "tasks" / "prepare" / "parquet.py"}' in verbose.stderr


def test_configuration_mistakes_are_one_line_before_anything_starts(tmp_path):
    typo = tmp_path / "sampling.yaml"
    typo.write_text("max_tokens: 8\nextra: {min_token: 2}\n")
    cases = {
        ("run", "--sampling", str(typo)): f"vbf run: error: sampling config {typo}: extra: 'min_token' is not a field of "
        "vllm.SamplingParams",
        ("run", "--reasoning-parser", "deepseek_r"): "reasoning_parser: vLLM 0.32.0 has no reasoning parser 'deepseek_r'; "
        "did you mean 'deepseek_r1'?",
        ("run", "--temperature", "-1"): "vbf run: error: temperature: Input should be greater than or equal to 0",
        ("run", "--chat-template-kwargs", "{enable_thinking: false}"): "vbf run: error: --chat-template-kwargs: not valid "
        "JSON (Expecting property name enclosed in double quotes at character 1): {enable_thinking: false}",
        ("judge", "r1", "r2", "--chat-template-kwargs", "[1]"): "vbf judge: error: --chat-template-kwargs: expected a JSON "
        """object such as '{"enable_thinking": false}', got [1]""",
        ("run", "--engine", "openai"): "vbf run: error: engine 'openai' needs base_url",
        ("run", "--spec", str(tmp_path / "nope.yaml")): "nope.yaml: file not found",
        ("sql", "SELECT 1", "--duckdb", str(tmp_path / "none.duckdb")): "none.duckdb does not exist: run `vbf run` first",
    }
    for args, message in cases.items():
        completed = vbf(tmp_path, *args, check=False)
        assert completed.returncode == 1 and message in completed.stderr, (args, completed.stderr)
        assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1


def test_every_subcommand_says_what_it_does_with_an_example(tmp_path):
    for command in (
        ["run"],
        ["export"],
        ["rescore"],
        ["rerun"],
        ["compare"],
        ["review", "push"],
        ["review", "pull"],
        ["review", "export"],
        ["sql"],
        ["cluster"],
    ):
        completed = vbf(tmp_path, *command, "--help")
        assert "example:" in completed.stdout and f"vbf {' '.join(command)}" in completed.stdout.split("example:")[1]


@pytest.mark.slow
def test_vbf_rescore_and_export_work_on_a_stored_run(tmp_path, committed_store, query):
    flags = ["--duckdb", committed_store.duckdb_path, "--storage", committed_store.storage]
    vbf(tmp_path, "rescore", "r1", "--scorer", "valid_json", *flags)
    assert query(committed_store, "SELECT count(*) FROM scores WHERE scorer = 'valid_json'") == [(1,)]  # the error row has none

    vbf(tmp_path, "export", str(tmp_path / "out"), "--run", "r1", "--format", "chat_jsonl", *flags)
    lines = (tmp_path / "out" / "r1.chat.jsonl").read_text().splitlines()
    assert [json.loads(line)["messages"][-1] for line in lines] == [{"role": "assistant", "content": "x"}]
    assert not (tmp_path / "out" / "r1.parquet").exists()  # only the format asked for

    unknown = vbf(tmp_path, "export", str(tmp_path / "out"), "--run", "nope", *flags, check=False)
    assert unknown.returncode == 1 and "vbf export: error: run nope: not in this results file" in unknown.stderr


def test_compare_variants_are_names_with_sampling_and_prompt_settings():
    from flows.commands import parse_variant
    from tasks.config import SamplingConfig

    base = SamplingConfig(max_tokens=8)
    assert parse_variant("greedy", base) == {"name": "greedy", "sampling": None}
    sampled = parse_variant("sampled:temperature=0.8,seed=1,system_prompt=Be brief.", base)
    assert sampled["sampling"] == {**base.model_dump(), "temperature": 0.8, "seed": 1}
    assert sampled["system_prompt"] == "Be brief." and sampled["name"] == "sampled"
    assert parse_variant("other:model=/models/x", base)["model"].model == "/models/x"


def test_the_console_drops_a_user_errors_traceback_and_keeps_a_bugs():
    """Prefect logs a failing task with its traceback, and sometimes a hiccup (an event it could not
    send) raised while handling that failure: neither repeats the user's error; a bug keeps its traceback."""
    import io
    import logging

    from flows.commands import HideUserErrors
    from tasks.config import SpecError

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(HideUserErrors())
    logger = logging.getLogger("vbf-console-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        raise SpecError("dataset file x.parquet: not a readable Parquet file")
    except SpecError:
        logger.error("Task run failed", exc_info=True)
        try:
            raise RuntimeError("Cannot put items in a stopped service instance.")
        except RuntimeError:
            logger.error("Error emitting event", exc_info=True)
    try:
        raise KeyError("a bug")
    except KeyError:
        logger.error("Something broke", exc_info=True)
    assert stream.getvalue().splitlines()[:2] == ["Error emitting event", "Something broke"]
    assert "KeyError: 'a bug'" in stream.getvalue() and "x.parquet" not in stream.getvalue()


@pytest.mark.slow
def test_vbf_run_batch_writes_one_line_per_input_line_and_a_rerun_computes_nothing(tmp_path, tiny_model_dir, query):
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"Question {i % 5}?"}], "max_tokens": 4},
        }
        for i in range(12)
    ]
    lines.append(
        {"custom_id": "p1", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "Once", "max_tokens": 3}}
    )
    lines.append(
        {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [], "tools": []}}
    )
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["-i", str(tmp_path / "requests.jsonl"), "--model", str(tiny_model_dir), *TINY_ENGINE, *store_flags(tmp_path)]

    first = vbf(tmp_path, "run-batch", *args, "-o", str(tmp_path / "out.jsonl"), "--error-file", str(tmp_path / "errors.jsonl"))
    output = {row["custom_id"]: row for row in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    (error,) = map(json.loads, (tmp_path / "errors.jsonl").read_text().splitlines())
    assert sorted(output) == sorted(line["custom_id"] for line in lines[:13]) and error["custom_id"] == "bad"
    assert error["error"]["code"] == "invalid_request" and "tools" in error["error"]["message"]
    assert output["p1"]["response"]["body"]["object"] == "text_completion"
    assert (
        output["c0"]["response"]["body"]["choices"][0]["message"]["content"]
        == output["c5"]["response"]["body"]["choices"][0]["message"]["content"]
    )
    stored = dict(query(tmp_path / "results.duckdb", "SELECT custom_id, text FROM run_outputs WHERE custom_id IN ('c3', 'p1')"))
    assert stored == {
        "c3": output["c3"]["response"]["body"]["choices"][0]["message"]["content"],
        "p1": output["p1"]["response"]["body"]["choices"][0]["text"],
    }
    assert ENGINE_START in engine_log(first)

    # Again, with the errors in the output file as vllm run-batch writes them: nothing is computed again.
    second = vbf(tmp_path, "run-batch", *args, "-o", str(tmp_path / "again.jsonl"))
    again = {row["custom_id"]: row for row in map(json.loads, (tmp_path / "again.jsonl").read_text().splitlines())}
    assert sorted(again) == sorted(line["custom_id"] for line in lines) and again["bad"]["error"]["code"] == "invalid_request"
    assert all(again[key]["response"]["body"]["choices"] == output[key]["response"]["body"]["choices"] for key in output)
    assert ENGINE_START not in engine_log(second)
    outputs = query(tmp_path / "results.duckdb", "SELECT count(*) FROM outputs")
    assert outputs == [(6,)]  # 5 distinct questions and 1 prompt, each computed once
