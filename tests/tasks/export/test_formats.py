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


def alternative(token: str, logprob: float) -> dict:
    return {"token": token, "token_id": None, "logprob": logprob}


# Two answer tokens: " é" chosen at rank 1, then "!" chosen outside the top 2 (sampled), whose runner-up was ruled out.
TOKENS = [
    {"token": " é", "token_id": 7, "logprob": -0.25, "top": [alternative(" é", -0.25), alternative(" e", -1.5)]},
    {"token": "!", "token_id": 3, "logprob": -4.0, "top": [alternative(".", -0.5), alternative("?", float("-inf"))]},
]


def test_stored_token_logprobs_become_openais_chat_logprobs_and_the_sdk_reads_them():
    from openai.types.chat import ChatCompletion

    line = batch_line([row(text=" é!", completion_tokens=2, token_logprobs=TOKENS), row(sample_index=1, token_logprobs=None)])
    body = json.loads(line.model_dump_json())["response"]["body"]
    asked, not_asked = body["choices"]
    assert not_asked["logprobs"] is None
    assert asked["logprobs"] == {
        "content": [
            {
                "token": " é",
                "logprob": -0.25,
                "bytes": [32, 195, 169],
                "top_logprobs": [
                    {"token": " é", "logprob": -0.25, "bytes": [32, 195, 169]},
                    {"token": " e", "logprob": -1.5, "bytes": [32, 101]},
                ],
            },
            {
                "token": "!",
                "logprob": -4.0,
                "bytes": [33],
                "top_logprobs": [
                    {"token": ".", "logprob": -0.5, "bytes": [46]},
                    {"token": "?", "logprob": -9999.0, "bytes": [63]},  # JSON has no -inf: OpenAI's and vLLM's floor
                ],
            },
        ],
        "refusal": None,
    }
    sdk = ChatCompletion.model_validate(body)  # the official client's own model of a response
    assert [t.token for t in sdk.choices[0].logprobs.content] == [" é", "!"]
    assert sdk.choices[0].logprobs.content[0].top_logprobs[1].logprob == -1.5


def test_stored_token_logprobs_become_openais_completion_logprobs_with_the_chosen_token_in_each_map():
    from openai.types import Completion

    line = batch_line([row(messages=None, prompt="Once", text=" é!", completion_tokens=2, token_logprobs=TOKENS)])
    body = json.loads(line.model_dump_json())["response"]["body"]
    assert body["choices"][0]["logprobs"] == {
        "tokens": [" é", "!"],
        "token_logprobs": [-0.25, -4.0],
        "top_logprobs": [{" é": -0.25, " e": -1.5}, {"!": -4.0, ".": -0.5, "?": -9999.0}],
        "text_offset": [0, 2],  # where each token starts in the text
    }
    sdk = Completion.model_validate(body)
    assert sdk.choices[0].logprobs.tokens == [" é", "!"]
    assert batch_line([row(messages=None, prompt="Once")]).response.body.choices[0].logprobs is None
