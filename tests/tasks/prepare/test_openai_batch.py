"""OpenAI batch lines, field by field: each supported field becomes the request or its overrides (through
load and render, so the stored request is what is checked); each unsupported field is a rejected row naming it."""

import json

import pytest

from tasks.config import DatasetSpec
from tasks.prepare.dataset import check_dataset, iter_batches
from tasks.prepare.render import Renderer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]


def render_lines(tmp_path, lines: list[dict]) -> tuple[list[dict], list[dict]]:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    checked = check_dataset(DatasetSpec(name="t", source=str(path)))
    assert checked.spec.format == "openai_batch"
    renderer = Renderer(checked.spec, "chat")
    requests, rejected = [], []
    for batch in iter_batches(checked, batch_size=100):
        ok, bad = renderer.render(batch)
        requests += ok.to_pylist()
        rejected += bad.to_pylist()
    return requests, rejected


def line(body: dict, url: str = CHAT, custom_id: str = "r") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "gpt-x", **body}}


def one_request(tmp_path, body: dict, url: str = CHAT) -> dict:
    requests, rejected = render_lines(tmp_path, [line(body, url)])
    assert rejected == []
    (request,) = requests
    return request


SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("body", "overrides"),
    [
        ({"max_completion_tokens": 7}, {"max_tokens": 7}),
        ({"max_tokens": 9}, {"max_tokens": 9}),
        ({"temperature": 0.5, "top_p": 0.9}, {"temperature": 0.5, "top_p": 0.9}),
        ({"n": 3, "seed": 11}, {"n": 3, "seed": 11}),
        ({"stop": "END"}, {"stop": ["END"]}),
        ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
        ({"presence_penalty": 0.5, "frequency_penalty": -0.5}, {"presence_penalty": 0.5, "frequency_penalty": -0.5}),
        ({"logit_bias": {"42": 100, "7": -100}}, {"logit_bias": {"42": 100.0, "7": -100.0}}),
        ({"logprobs": True}, {"logprobs": 0}),
        ({"logprobs": True, "top_logprobs": 5}, {"logprobs": 5}),
        ({"logprobs": False}, None),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "strict": True, "schema": SCHEMA}}},
         {"structured": {"json_schema": SCHEMA}}),
        ({"response_format": {"type": "json_object"}}, {"structured": {"json_object": True}}),
        ({"response_format": {"type": "text"}}, None),
        ({"min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5], "bad_words": ["x"], "skip_special_tokens": False},
         {"min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5], "bad_words": ["x"], "skip_special_tokens": False}),
        ({"truncate_prompt_tokens": 8, "prompt_logprobs": 1}, {"truncate_prompt_tokens": 8, "prompt_logprobs": 1}),
        ({"structured_outputs": {"regex": "[a-z]+"}}, {"structured": {"regex": "[a-z]+"}}),
        ({"structured_outputs": {"json": SCHEMA}}, {"structured": {"json_schema": SCHEMA}}),
        ({"include_stop_str_in_output": True}, {"extra": {"include_stop_str_in_output": True}}),
        ({"chat_template_kwargs": {"enable_thinking": False}}, {"chat_template_kwargs": {"enable_thinking": False}}),
        ({"user": "someone", "metadata": {"team": "a"}}, None),
    ],
)  # fmt: skip
def test_each_supported_chat_field_becomes_an_override_of_the_request(tmp_path, body, overrides):
    request = one_request(tmp_path, {"messages": HI, **body})
    assert json.loads(request["messages"]) == HI
    assert (json.loads(request["overrides"]) if request["overrides"] else None) == overrides


def test_user_and_metadata_are_not_part_of_the_request_identity_but_overrides_are(tmp_path):
    requests, rejected = render_lines(
        tmp_path,
        [
            line({"messages": HI}, custom_id="plain"),
            line({"messages": HI, "user": "u1", "metadata": {"k": "v"}}, custom_id="tagged"),
            line({"messages": HI, "seed": 3}, custom_id="seeded"),
            line({"messages": HI, "logit_bias": {"5": 1}}, custom_id="biased"),
        ],
    )
    assert rejected == []
    keys = {r["custom_id"]: r["request_key"] for r in requests}
    assert keys["plain"] == keys["tagged"]
    assert len({keys["plain"], keys["seeded"], keys["biased"]}) == 3
    # The prompt budget counts the prompt, not its overrides.
    assert len({r["approx_tokens"] for r in requests}) == 1


def test_content_part_arrays_are_joined_as_vllm_joins_them(tmp_path):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    request = one_request(
        tmp_path, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]}
    )
    assert json.loads(request["messages"]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first\nsecond"},
    ]
    # The same text written as one string is the same request.
    same = one_request(
        tmp_path, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first\nsecond"}]}
    )
    assert same["request_key"] == request["request_key"]


def test_completion_lines_send_their_prompt_as_it_is_with_their_overrides(tmp_path):
    request = one_request(tmp_path, {"prompt": "Once upon", "logprobs": 2, "max_tokens": 5}, COMPLETIONS)
    assert (request["prompt"], request["messages"]) == ("Once upon", None)
    assert json.loads(request["overrides"]) == {"logprobs": 2, "max_tokens": 5}


@pytest.mark.parametrize(
    ("url", "body", "field", "reason"),
    [
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "body.messages[0].content[1]", "image content is not supported yet"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "body.messages[0].content[0]", "input_audio content is not supported yet"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "refusal"}]}]}, "body.messages[0].content[0]", "'refusal' is not supported"),
        (CHAT, {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "body.messages[0].name", "'name' is not supported"),
        (CHAT, {"messages": HI, "tools": []}, "body.tools", "field 'tools' is not supported on /v1/chat/completions"),
        (CHAT, {"messages": HI, "stream": True}, "body.stream", "field 'stream' is not supported"),
        (CHAT, {"messages": HI, "max_tokens": 3, "max_completion_tokens": 4}, "body.max_completion_tokens", "not both"),
        (CHAT, {"messages": HI, "top_logprobs": 3}, "body.top_logprobs", "needs logprobs: true"),
        (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 30}, "body.top_logprobs", "from 0 to 20"),
        (CHAT, {"messages": HI, "logprobs": 2}, "body.logprobs", "true or false"),
        (CHAT, {"messages": HI, "response_format": {"type": "xml"}}, "body.response_format.type", "'xml' is not supported"),
        (CHAT, {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "s"}}},
         "body.response_format.json_schema.schema", "missing"),
        (CHAT, {"messages": HI, "response_format": "json"}, "body.response_format", "must be an object"),
        (CHAT, {"prompt": "x", "messages": HI}, "body.prompt", "field 'prompt' is not supported on /v1/chat/completions"),
        (COMPLETIONS, {"prompt": "x", "echo": True}, "body.echo", "field 'echo' is not supported on /v1/completions"),
        (COMPLETIONS, {"prompt": "x", "messages": HI}, "body.messages", "field 'messages' is not supported"),
        (COMPLETIONS, {"prompt": "x", "top_logprobs": 2}, "body.top_logprobs", "use logprobs"),
        (COMPLETIONS, {"prompt": ["a", "b"]}, "body.prompt", "one string"),
        (CHAT, {"messages": HI, "logit_bias": {"5": 500}}, "logit_bias", "less than or equal to 100"),
        (CHAT, {"messages": HI, "temperature": -1}, "temperature", "greater than or equal to 0"),
        (CHAT, {"messages": HI, "min_token": 2}, "body.min_token", "field 'min_token' is not supported"),
        (CHAT, {"messages": HI, "output_kind": 1}, "body.output_kind", "field 'output_kind' is not supported"),
        (CHAT, {"messages": HI, "structured_outputs": {"regex": "a", "choice": ["b"]}}, "body.structured_outputs", "one of json"),
        (CHAT, {"messages": HI, "structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "body.structured_outputs", "not both"),
        (CHAT, {"messages": HI, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "keep no prompt token"),
        (CHAT, {"messages": HI, "chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs", "set by the engine"),
        (COMPLETIONS, {"prompt": "x", "chat_template_kwargs": {"enable_thinking": False}}, "body.chat_template_kwargs",
         "field 'chat_template_kwargs' is not supported on /v1/completions"),
    ],
)  # fmt: skip
def test_each_unsupported_field_is_a_rejected_row_naming_the_line_and_field(tmp_path, url, body, field, reason):
    good = line({"messages": HI}, custom_id="good")
    requests, rejected = render_lines(tmp_path, [good, line(body, url, custom_id="bad")])
    assert [r["custom_id"] for r in requests] == ["good"]  # the other lines go on
    (row,) = rejected
    assert (row["custom_id"], row["source_row"], row["field"]) == ("bad", 1, field)
    assert reason in row["reason"]
    if field.startswith("body."):
        assert row["reason"].startswith(f"line 2: {field}: ")
