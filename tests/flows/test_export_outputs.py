import json

import pyarrow.parquet as pq
import pytest

from flows.export_outputs import export_outputs
from tasks.config import SpecError
from tasks.export.formats import BatchOutputLine

pytestmark = pytest.mark.slow  # whole flows (no vLLM)


def read_lines(path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_a_run_exports_to_parquet_chat_jsonl_and_openai_batch_files(prefect_harness, committed_store, tmp_path):
    exported = {item.format: item for item in export_outputs(str(tmp_path / "out"), run_id="r1", store=committed_store)}

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


def test_a_filter_narrows_the_export_and_an_unknown_run_is_named(prefect_harness, committed_store, tmp_path):
    (parquet,) = export_outputs(str(tmp_path / "out"), where="error_code IS NOT NULL", formats=["parquet"], store=committed_store)
    assert pq.read_table(parquet.path)["custom_id"].to_pylist() == ["b"]
    with pytest.raises(SpecError, match="run nope: not in this results file"):
        export_outputs(str(tmp_path / "out2"), run_id="nope", formats=["chat_jsonl"], store=committed_store)
    assert not (tmp_path / "out2" / "nope.chat.jsonl").exists()
    with pytest.raises(SpecError, match="export filter 'no_such_column = 1'.*no_such_column"):
        export_outputs(str(tmp_path / "out3"), where="no_such_column = 1", formats=["parquet"], store=committed_store)
