"""Export formats: OpenAI batch output lines and chat fine-tuning lines, checked against their schemas."""

import json

import pytest

from tasks.export.formats import BatchOutputLine, ChatExample, batch_line, chat_example


def row(**overrides) -> dict:
    return {
        "run_id": "r",
        "model": "m",
        "dataset_name": "d",
        "custom_id": "1",
        "sample_index": 0,
        "prompt": "hi",
        "messages": json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]),
        "text": "hello",
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "completion_tokens": 1,
        "error_code": None,
        "error": None,
        "output_id": "o1",
        "created": 1700000000,
        **overrides,
    }


def test_chat_lines_match_the_openai_schema_and_vllms_own_batch_record():
    line = batch_line([row(), row(sample_index=1, text="hey", finish_reason="length", completion_tokens=3)])
    assert line.response.body.object == "chat.completion"
    assert [c.message.content for c in line.response.body.choices] == ["hello", "hey"]
    assert line.response.body.usage.total_tokens == 9
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    BatchRequestOutput.model_validate_json(line.model_dump_json())  # vLLM's run_batch reads it too
    BatchRequestOutput.model_validate_json(batch_line([row(error_code="invalid_prompt", error="bad")]).model_dump_json())
    assert chat_example(row()) == ChatExample(
        messages=[
            {"role": "system", "content": "s"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    )
    with pytest.raises(ValueError, match="exactly one of response and error"):
        BatchOutputLine(id="x", custom_id="1", response=None, error=None)
