"""What every engine shares: per-row sampling overrides and the output record's schema."""

import json

import pytest

from tasks.config import SamplingConfig
from tasks.engines.base import OUTPUT_SCHEMA, OutputRecord, conformed, output_table, request_sampling


def test_row_overrides_apply_on_top_of_the_run_sampling_and_bad_ones_name_the_field():
    base = SamplingConfig(max_tokens=32, temperature=0.5)
    assert request_sampling(base, json.dumps({"max_tokens": 4})) == base.model_copy(update={"max_tokens": 4})
    assert request_sampling(base, None) is base
    with pytest.raises(ValueError, match="temperature: Input should be greater than or equal to 0"):
        request_sampling(base, json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="nope: Extra inputs are not permitted"):
        request_sampling(base, json.dumps({"nope": 1}))
    with pytest.raises(ValueError, match="not JSON"):
        request_sampling(base, "{max_tokens: 4")


def test_a_rerun_budget_stands_over_a_rows_own_and_a_rows_extra_adds_to_the_runs():
    base = SamplingConfig(max_tokens=64, max_tokens_wins=True, extra={"include_stop_str_in_output": True})
    row = request_sampling(
        base, json.dumps({"max_tokens": 2, "min_tokens": 1, "extra": {"spaces_between_special_tokens": False}})
    )
    assert (row.max_tokens, row.min_tokens) == (64, 1)
    assert row.extra == {"include_stop_str_in_output": True, "spaces_between_special_tokens": False}
    assert request_sampling(base.model_copy(update={"max_tokens_wins": None}), json.dumps({"max_tokens": 2})).max_tokens == 2
    with pytest.raises(
        ValueError, match="extra: 'min_token' is not a field of vllm.SamplingParams .*did you mean the field min_tokens"
    ):
        request_sampling(base, json.dumps({"extra": {"min_token": 1}}))


def test_the_output_schema_is_the_records_fields_with_their_arrow_types():
    table = output_table([OutputRecord("k", text="x", prompt_tokens=3), OutputRecord.failed("j", "invalid_request", "bad", 7)])
    assert table.schema == OUTPUT_SCHEMA and OUTPUT_SCHEMA.names[:3] == ["request_key", "sample_index", "text"]
    assert [str(OUTPUT_SCHEMA.field(name).type) for name in ("sample_index", "mean_logprob", "error")] == [
        "int32",
        "double",
        "string",
    ]
    assert table.to_pylist()[1] == {
        "request_key": "j",
        "sample_index": 0,
        "text": None,
        "finish_reason": None,
        "prompt_tokens": 7,
        "completion_tokens": None,
        "mean_logprob": None,
        "latency_seconds": None,
        "error_code": "invalid_request",
        "error": "bad",
        "error_kind": "permanent",
        "token_logprobs": None,
        "prompt_logprobs": None,
        "reasoning": None,
        "reasoning_tokens": None,
        "text_tokens": None,
        "reasoning_truncated": None,
    }
    # per token: a list of structs, each with its alternatives, logprobs in vLLM's float32
    assert str(OUTPUT_SCHEMA.field("token_logprobs").type) == (
        "list<item: struct<token: string, token_id: int32, logprob: float, "
        "top: list<item: struct<token: string, token_id: int32, logprob: float>>>>"
    )


def test_output_files_written_before_token_logprobs_and_reasoning_read_with_them_null():
    later = ["token_logprobs", "prompt_logprobs", "reasoning", "reasoning_tokens", "text_tokens", "reasoning_truncated"]
    table = conformed(output_table([OutputRecord("k", text="x")]).drop_columns(later))
    assert table.schema == OUTPUT_SCHEMA
    assert table.to_pylist()[0]["text"] == "x" and all(table[name].null_count == 1 for name in later)
