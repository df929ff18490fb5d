import json

import pyarrow.parquet as pq
import pytest

from flows.export_outputs import export_outputs
from tasks.config import SpecError, StoreConfig
from tasks.export import BatchOutputLine, ChatExample, batch_line, chat_example
from tasks.store import commit_run, connect, migrate


@pytest.fixture
def store(tmp_path, commit_inputs) -> StoreConfig:
    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "storage"))
    con = connect(store.duckdb_path)
    migrate(con)
    commit_run(con, *commit_inputs)
    con.close()
    return store


def read_lines(path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_a_run_exports_to_parquet_chat_jsonl_and_openai_batch_files(prefect_harness, store, tmp_path):
    exported = {item.format: item for item in export_outputs(str(tmp_path / "out"), run_id="r1", store=store)}

    table = pq.read_table(exported["parquet"].path)
    assert sorted(table["custom_id"].to_pylist()) == ["a", "b", "c"]  # duplicates included, with lineage
    assert {"source_file", "source_row", "shard_key", "reference", "error_code"} <= set(table.column_names)

    chat = read_lines(exported["chat_jsonl"].path)
    assert chat == [{"messages": [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "x"}]}]

    outputs = read_lines(exported["openai_batch_output"].path)
    errors = read_lines(exported["openai_batch_errors"].path)
    assert [line["custom_id"] for line in outputs] == ["a", "c"] and [line["custom_id"] for line in errors] == ["b"]
    for line in outputs + errors:
        BatchOutputLine.model_validate(line)
    body = outputs[0]["response"]["body"]
    assert (body["object"], body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == ("text_completion", "x", "length")
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert errors[0]["response"] is None and errors[0]["error"] == {"code": "context_length_exceeded", "message": "long"}
    assert len({line["id"] for line in outputs + errors}) == 3


def test_a_filter_narrows_the_export_and_an_unknown_run_is_named(prefect_harness, store, tmp_path):
    (parquet,) = export_outputs(str(tmp_path / "out"), where="error_code IS NOT NULL", formats=["parquet"], store=store)
    assert pq.read_table(parquet.path)["custom_id"].to_pylist() == ["b"]
    with pytest.raises(SpecError, match="run nope: not in this results file"):
        export_outputs(str(tmp_path / "out2"), run_id="nope", formats=["chat_jsonl"], store=store)
    assert not (tmp_path / "out2" / "nope.chat.jsonl").exists()
    with pytest.raises(SpecError, match="export filter 'no_such_column = 1'.*no_such_column"):
        export_outputs(str(tmp_path / "out3"), where="no_such_column = 1", formats=["parquet"], store=store)


def row(**overrides) -> dict:
    return {"run_id": "r", "model": "m", "dataset_name": "d", "custom_id": "1", "sample_index": 0, "prompt": "hi",
            "messages": json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]),
            "text": "hello", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 1, "error_code": None,
            "error": None, "output_id": "o1", "created": 1700000000, **overrides}  # fmt: skip


def test_chat_lines_match_the_openai_schema_and_vllms_own_batch_record():
    line = batch_line([row(), row(sample_index=1, text="hey", finish_reason="length", completion_tokens=3)])
    assert line.response.body.object == "chat.completion"
    assert [c.message.content for c in line.response.body.choices] == ["hello", "hey"]
    assert line.response.body.usage.total_tokens == 9
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    BatchRequestOutput.model_validate_json(line.model_dump_json())  # vLLM's run_batch reads it too
    BatchRequestOutput.model_validate_json(batch_line([row(error_code="invalid_prompt", error="bad")]).model_dump_json())
    assert chat_example(row()) == ChatExample(messages=[
        {"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    ])  # fmt: skip
    with pytest.raises(ValueError, match="exactly one of response and error"):
        BatchOutputLine(id="x", custom_id="1", response=None, error=None)
