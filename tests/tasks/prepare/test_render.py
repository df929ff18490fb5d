import json

import pyarrow as pa

from tasks.config import DatasetSpec
from tasks.keys import content_hash
from tasks.prepare.render import Renderer, request_content
from tasks.prepare.sources import SourceBatch


def spec(**overrides) -> DatasetSpec:
    return DatasetSpec(**{"name": "t", "source": "x.parquet", "id_column": "id", "prompt_column": "prompt", **overrides})


def batch(rows: list[dict]) -> SourceBatch:
    return SourceBatch("data/x.parquet", 100, pa.RecordBatch.from_pylist(rows))


def test_chat_request_has_system_and_user_messages_and_a_content_key():
    requests, rejected = Renderer(spec(system_prompt="Be brief."), "chat").render(batch([{"id": 7, "prompt": "Hi"}]))
    row = requests.to_pylist()[0]
    assert row["custom_id"] == "7"
    assert json.loads(row["messages"]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert row["request_key"] == content_hash(request_content("Hi", "Be brief.", "chat"))
    assert (row["source_file"], row["source_row"]) == ("data/x.parquet", 100)
    assert rejected.num_rows == 0


def test_completion_request_sends_the_prompt_text():
    requests, _ = Renderer(spec(), "completion").render(batch([{"id": "a", "prompt": "Once upon"}]))
    row = requests.to_pylist()[0]
    assert row["prompt"] == "Once upon" and row["messages"] is None


def test_request_key_depends_on_content_only():
    rows = [{"id": "a", "prompt": "Same"}, {"id": "b", "prompt": "Same"}, {"id": "c", "prompt": "Other"}]
    keys = Renderer(spec(), "chat").render(batch(rows))[0]["request_key"].to_pylist()
    assert keys[0] == keys[1] != keys[2]
    completion_key = Renderer(spec(), "completion").render(batch(rows[:1]))[0]["request_key"][0].as_py()
    assert completion_key != keys[0]


def test_template_renders_over_row_columns():
    renderer = Renderer(spec(prompt_column=None, prompt_template="Summarize {{ title }}: {{ body }}"), "completion")
    requests, _ = renderer.render(batch([{"id": 1, "title": "T", "body": "B"}]))
    assert requests["prompt"].to_pylist() == ["Summarize T: B"]


def test_null_empty_and_unrenderable_rows_are_rejected_with_their_location():
    rows = [
        {"id": "ok", "prompt": "fine"},
        {"id": "n", "prompt": None},
        {"id": "e", "prompt": "  \n"},
        {"id": None, "prompt": "no id"},
    ]
    requests, rejected = Renderer(spec(), "chat").render(batch(rows))
    assert requests["custom_id"].to_pylist() == ["ok"]
    assert [(r["source_row"], r["custom_id"], r["field"], r["reason"]) for r in rejected.to_pylist()] == [
        (101, "n", "prompt", "prompt is null"),
        (102, "e", "prompt", "prompt is empty"),
        (103, None, "id", "id is null or empty"),
    ]
    assert set(rejected["source_file"].to_pylist()) == {"data/x.parquet"}

    templated = Renderer(spec(prompt_column=None, prompt_template="{{ missing }}"), "chat")
    _, rejected = templated.render(batch([{"id": 1}]))
    assert rejected["field"].to_pylist() == ["prompt_template"]
    assert "missing" in rejected["reason"][0].as_py()


def test_the_reference_column_is_carried_as_text_and_is_not_part_of_the_request_key():
    with_reference = Renderer(spec(reference_column="answer"), "chat")
    requests, _ = with_reference.render(
        batch([{"id": 1, "prompt": "2+2?", "answer": 4}, {"id": 2, "prompt": "2+2?", "answer": None}])
    )
    first, second = requests.to_pylist()
    assert (first["reference"], second["reference"]) == ("4", None)
    assert first["request_key"] == second["request_key"]  # same question: one answer, computed once
    plain, _ = Renderer(spec(), "chat").render(batch([{"id": 1, "prompt": "2+2?", "answer": 4}]))
    assert plain.to_pylist()[0]["reference"] is None


SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}


def test_a_rows_sampling_and_structured_columns_become_its_overrides_and_part_of_its_key():
    renderer = Renderer(
        spec(sampling_column="sampling", structured_columns={"json_schema": "schema", "regex": "pattern", "choice": "options"}),
        "chat",
    )
    rows = [
        {"id": "text", "prompt": "q", "sampling": '{"min_tokens": 2, "extra": {"include_stop_str_in_output": true}}'},
        {"id": "schema", "prompt": "q", "schema": json.dumps(SCHEMA)},
        {"id": "regex", "prompt": "q", "pattern": "[0-9]+", "sampling": '{"stop_token_ids": [5]}'},
        {"id": "choices", "prompt": "q", "options": '["yes", "no"]'},
        {"id": "plain", "prompt": "q"},
    ]
    requests, rejected = renderer.render(
        batch([{"sampling": None, "schema": None, "pattern": None, "options": None, **r} for r in rows])
    )
    assert rejected.num_rows == 0
    overrides = {r["custom_id"]: json.loads(r["overrides"] or "null") for r in requests.to_pylist()}
    assert overrides == {
        "text": {"min_tokens": 2, "extra": {"include_stop_str_in_output": True}},
        "schema": {"structured": {"json_schema": SCHEMA}},
        "regex": {"stop_token_ids": [5], "structured": {"regex": "[0-9]+"}},
        "choices": {"structured": {"choice": ["yes", "no"]}},
        "plain": None,
    }
    assert len(set(requests["request_key"].to_pylist())) == 5  # same prompt, five requests


def test_a_struct_sampling_column_leaves_its_null_fields_unset():
    sampling = pa.array(
        [{"min_tokens": 3, "ignore_eos": None}, {"min_tokens": None, "ignore_eos": True}],
        pa.struct([("min_tokens", pa.int64()), ("ignore_eos", pa.bool_())]),
    )
    table = pa.table({"id": ["a", "b"], "prompt": ["q", "q"], "sampling": sampling})
    requests, _ = Renderer(spec(sampling_column="sampling"), "chat").render(SourceBatch("x.parquet", 0, table.to_batches()[0]))
    assert [json.loads(o) for o in requests["overrides"].to_pylist()] == [{"min_tokens": 3}, {"ignore_eos": True}]


def test_a_bad_row_sampling_is_a_rejected_row_naming_the_row_and_the_field():
    renderer = Renderer(spec(sampling_column="sampling", structured_columns={"json_schema": "schema"}), "chat")
    rows = [
        {"id": "ok", "prompt": "q", "sampling": '{"min_tokens": 1}', "schema": None},
        {"id": "typo", "prompt": "q", "sampling": '{"extra": {"min_token": 1}}', "schema": None},
        {"id": "own", "prompt": "q", "sampling": '{"extra": {"temperature": 1}}', "schema": None},
        {"id": "range", "prompt": "q", "sampling": '{"min_tokens": -1}', "schema": None},
        {"id": "json", "prompt": "q", "sampling": "{min_tokens: 1", "schema": None},
        {"id": "twice", "prompt": "q", "sampling": '{"structured": {"regex": "a"}}', "schema": json.dumps(SCHEMA)},
        {"id": "schema", "prompt": "q", "sampling": None, "schema": "[1, 2"},
    ]
    requests, rejected = renderer.render(batch(rows))
    assert requests["custom_id"].to_pylist() == ["ok"]
    found = {r["custom_id"]: (r["source_row"], r["field"], r["reason"]) for r in rejected.to_pylist()}
    assert found["typo"][:2] == (101, "sampling.extra")
    assert "'min_token' is not a field of vllm.SamplingParams" in found["typo"][2] and "min_tokens" in found["typo"][2]
    assert found["own"][1] == "sampling.extra" and "set temperature instead" in found["own"][2]
    assert found["range"][1] == "sampling.min_tokens" and "greater than or equal to 0" in found["range"][2]
    assert found["json"][1] == "sampling" and "not valid JSON" in found["json"][2]
    assert found["twice"][1] == "schema" and "a second structured output" in found["twice"][2]
    assert found["schema"][1] == "schema" and "json_schema is not valid JSON" in found["schema"][2]
