"""Per-row sampling through the whole flow on real vLLM: a dataset's JSON-schema, regex and choice columns
and its sampling column, and OpenAI batch lines' response_format and vLLM fields. Every JSON answer
validates against its own row's schema; what a row set is stored with its request; a mistake in a row is
a rejected row naming it, and a mistake in the run's sampling fails before anything is written."""

import json

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, SamplingConfig, SpecError, openai_batch_dataset
from tasks.export.batch_files import write_batch_result

pytestmark = pytest.mark.slow

SCHEMAS = [
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 6}}, "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}},
     "required": ["n", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}}, "required": ["label"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 3},
]  # fmt: skip


def no_whitespace(tokenizer) -> dict[int, float]:
    """−100 on the whitespace-only tokens: under a JSON constraint the random tiny model otherwise pads its
    answer with newlines until max_tokens (vLLM takes JSON's optional whitespace from its engine settings)."""
    return {i: -100.0 for i in range(len(tokenizer)) if tokenizer.decode([i]) and not tokenizer.decode([i]).strip()}


@pytest.fixture(scope="module")
def whitespace(tiny_model_dir) -> dict[int, float]:
    from transformers import AutoTokenizer

    return no_whitespace(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_each_rows_schema_regex_choice_and_sampling_reach_vllm_and_every_json_answer_validates(
    prefect_harness, tiny_model, tmp_path, store, query, whitespace
):
    stop_at_space = {"stop": [" "], "extra": {"include_stop_str_in_output": True}}
    rows = [
        *({"id": f"schema-{i}", "schema": json.dumps(s)} for i, s in enumerate(SCHEMAS)),
        {"id": "regex", "pattern": "[0-9]{3}-[a-z]{2}"},
        {"id": "choice", "options": '["yes", "no", "maybe"]'},
        {"id": "stop-at-space", "prompt": "Tell me a story.", "sampling": json.dumps(stop_at_space)},
        {"id": "stop-at-space-late", "prompt": "Tell me a story.", "sampling": json.dumps({**stop_at_space, "min_tokens": 10})},
        {"id": "typo", "sampling": '{"extra": {"min_token": 3}}'},
        {"id": "run-level"},
    ]
    table = pa.Table.from_pylist(
        [
            {"prompt": f"Question {i}?", "schema": None, "pattern": None, "options": None, "sampling": None, **r}
            for i, r in enumerate(rows)
        ]
    )
    pq.write_table(table, tmp_path / "rows.parquet")
    spec = DatasetSpec(
        name="rows",
        source=str(tmp_path / "rows.parquet"),
        id_column="id",
        prompt_column="prompt",
        sampling_column="sampling",
        structured_columns={"json_schema": "schema", "regex": "pattern", "choice": "options"},
    )
    summary = batch_inference(
        dataset=spec, model=tiny_model, sampling=SamplingConfig(max_tokens=48, logit_bias=whitespace), store=store
    )
    assert (summary.rejected, summary.outputs, summary.errors) == (1, len(rows) - 1, 0)

    (rejected,) = query(store, "SELECT source_file, source_row, custom_id, field, reason FROM rejected_rows")
    assert rejected[:4] == (str(tmp_path / "rows.parquet"), 8, "typo", "sampling.extra")  # its file, row and field
    assert "'min_token' is not a field of vllm.SamplingParams" in rejected[4] and "min_tokens" in rejected[4]

    answers = dict(
        query(store, "SELECT custom_id, {'text': text, 'finish': finish_reason, 'tokens': completion_tokens} FROM run_outputs")
    )
    for i, schema in enumerate(SCHEMAS):
        assert answers[f"schema-{i}"]["finish"] == "stop", answers[f"schema-{i}"]
        jsonschema.validate(json.loads(answers[f"schema-{i}"]["text"]), schema)  # raises unless it fits its row's schema
    assert answers["regex"]["text"][:3].isdigit() and answers["regex"]["text"][3] == "-"
    assert answers["choice"]["text"] in {"yes", "no", "maybe"}
    early, late = answers["stop-at-space"], answers["stop-at-space-late"]
    assert early["finish"] == late["finish"] == "stop" and early["text"].endswith(" ") and late["text"].endswith(" ")
    assert late["tokens"] >= 10 > early["tokens"]  # min_tokens: no stop before the tenth token

    # What a row set is part of its request (and its key); the run's own sampling is recorded with the run.
    overrides = dict(query(store, "SELECT custom_id, overrides FROM requests WHERE overrides IS NOT NULL"))
    assert json.loads(overrides["schema-2"]) == {"structured": {"json_schema": SCHEMAS[2]}}
    assert json.loads(overrides["stop-at-space-late"]) == {**stop_at_space, "min_tokens": 10}
    assert "run-level" not in overrides
    (recorded,) = query(store, "SELECT sampling_params FROM runs")
    assert json.loads(recorded[0])["logit_bias"] == {str(k): v for k, v in whitespace.items()}


def test_openai_lines_response_format_and_vllm_fields_and_a_run_vllm_refuses_stores_nothing(
    prefect_harness, tiny_model, tmp_path, store, query, whitespace
):
    from openai.types.chat import ChatCompletion

    bias = {str(token): value for token, value in whitespace.items()}

    def line(custom_id: str, **body) -> str:
        question = [{"role": "user", "content": f"Question {custom_id}?"}]
        return json.dumps(
            {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "m", "max_tokens": 48, "messages": question, "logit_bias": bias, **body}}
        )  # fmt: skip

    lines = [
        *(
            line(f"schema-{i}", response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s}})
            for i, s in enumerate(SCHEMAS)
        ),
        line("object", response_format={"type": "json_object"}),
        line("vllm", structured_outputs={"choice": ["up", "down"]}, min_tokens=1, spaces_between_special_tokens=False),
    ]
    (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
    summary = batch_inference(dataset=openai_batch_dataset(str(tmp_path / "batch.jsonl"), "batch"), model=tiny_model, store=store)
    assert (summary.rejected, summary.errors, summary.outputs) == (0, 0, len(lines))
    write_batch_result(store, summary.run_id, str(tmp_path / "out.jsonl"), None)

    answers = {}
    for text in (tmp_path / "out.jsonl").read_text().splitlines():
        out = json.loads(text)
        answers[out["custom_id"]] = ChatCompletion.model_validate(out["response"]["body"]).choices[0]
    for i, schema in enumerate(SCHEMAS):
        assert answers[f"schema-{i}"].finish_reason == "stop"
        jsonschema.validate(json.loads(answers[f"schema-{i}"].message.content), schema)
    assert answers["object"].finish_reason == "stop" and isinstance(json.loads(answers["object"].message.content), dict)
    assert answers["vllm"].message.content in {"up", "down"}
    (vllm_line,) = query(store, "SELECT overrides FROM requests WHERE custom_id = 'vllm'")
    stored = json.loads(vllm_line[0])
    assert stored["structured"] == {"choice": ["up", "down"]} and stored["min_tokens"] == 1
    assert stored["extra"] == {"spaces_between_special_tokens": False}

    # Values only vLLM can judge, in the run's own sampling: the run fails before preparing or storing anything.
    elsewhere = store.model_copy(update={"duckdb_path": str(tmp_path / "refused.duckdb")})
    with pytest.raises(SpecError, match="sampling parameters rejected by vLLM: .*min_tokens"):
        batch_inference(
            dataset=openai_batch_dataset(str(tmp_path / "batch.jsonl"), "batch"),
            model=tiny_model,
            sampling=SamplingConfig(max_tokens=4, min_tokens=9),
            store=elsewhere,
        )
    assert not (tmp_path / "refused.duckdb").exists()
