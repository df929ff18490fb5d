"""OpenAI batch input lines: a line's body becomes a request (chat messages or a prompt, and per-request
sampling overrides in SamplingOverrides' names), or a rejected row naming the line and the field.

Every body field is either mapped, or accepted as not changing the answer (`model`, `user`,
`metadata`), or a rejected row: a field this project cannot honour is never dropped silently. Any
other field of the installed vLLM's SamplingParams (its server takes them in the body too) is kept
under `extra`.
"""

from __future__ import annotations

import json

from tasks.prepare.sources import OPENAI_URLS, rejected

CHAT_URL = "/v1/chat/completions"

# Body fields whose name and meaning are SamplingOverrides' own (vLLM's).
SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "top_k",  # vLLM's extensions, which its OpenAI server accepts too
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "bad_words",
    "skip_special_tokens",
    "truncate_prompt_tokens",
    "prompt_logprobs",
)
# vLLM's own spellings of structured output (its server's `structured_outputs`) → StructuredOutput's.
STRUCTURED_KINDS = {
    "json": "json_schema",
    "json_object": "json_object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}
# Accepted and left out of the request and its key: they describe the caller, not the answer (the flow's model runs).
IGNORED_FIELDS = ("model", "user", "metadata")
# Content parts that carry media: a rejected row until multimodal input lands.
MEDIA_PARTS = ("image_url", "input_image", "image", "image_pil", "image_embeds", "input_audio", "audio_url", "video_url", "file")


class LineError(ValueError):
    """A line this project cannot run as written; `field` is its path in the line (body.response_format.type)."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field


def openai_row(record: dict, file: str, line: int) -> tuple[dict | None, dict | None]:
    """An OpenAI batch line as (row, None) or (None, rejected row)."""
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        return None, rejected(file, line, "custom_id", f"line {line + 1}: custom_id missing or not text")
    url = record.get("url")
    if url not in OPENAI_URLS:
        return None, rejected(
            file,
            line,
            "url",
            f"line {line + 1}: url {url!r} is not supported (only {', '.join(OPENAI_URLS)})",
            custom_id,
        )
    body = record.get("body")
    if not isinstance(body, dict):
        return None, rejected(file, line, "body", f"line {line + 1}: body missing or not an object", custom_id)
    try:
        prompt, messages, overrides = line_request(url, body)
    except LineError as error:
        return None, rejected(file, line, error.field, f"line {line + 1}: {error.field}: {error}", custom_id)
    return {
        "custom_id": custom_id,
        "prompt": prompt,
        "messages": json.dumps(messages, ensure_ascii=False) if messages is not None else None,
        "overrides": json.dumps(overrides, ensure_ascii=False, sort_keys=True) if overrides else None,
    }, None


def line_request(url: str, body: dict) -> tuple[str | None, list | None, dict]:
    """(prompt, messages, overrides) of a line's body; raises LineError naming the first field it cannot honour."""
    chat = url == CHAT_URL
    text_field = OPENAI_URLS[url]
    overrides: dict = {}
    for field, value in body.items():
        if field in IGNORED_FIELDS or field == text_field or field in ("logprobs", "top_logprobs"):
            continue
        if field in SAMPLING_FIELDS:
            overrides[field] = value
        elif field == "max_completion_tokens":
            if "max_tokens" in body:
                raise LineError("body.max_completion_tokens", "set max_tokens or max_completion_tokens, not both")
            overrides["max_tokens"] = value
        elif field == "response_format":
            structured = structured_output(value)
            if structured is not None:
                overrides["structured"] = structured
        elif field == "structured_outputs":
            if "response_format" in body:
                raise LineError("body.structured_outputs", "set response_format or structured_outputs, not both")
            overrides["structured"] = vllm_structured_output(value)
        elif field == "chat_template_kwargs" and chat:  # vLLM's extension of chat requests
            overrides[field] = value
        elif settable_sampling_field(field):
            overrides.setdefault("extra", {})[field] = value
        else:
            raise LineError(f"body.{field}", f"field {field!r} is not supported on {url}")
    logprobs = chat_logprobs(body) if chat else completion_logprobs(body)
    if logprobs is not None:
        overrides["logprobs"] = logprobs
    text = body.get(text_field)
    if chat:
        return None, (chat_messages(text) if isinstance(text, list) else text), overrides
    if not (text is None or isinstance(text, str)):
        raise LineError("body.prompt", "prompt must be one string")
    return text, None, overrides


def chat_logprobs(body: dict) -> int | None:
    """OpenAI chat: `logprobs: true` asks for them, `top_logprobs` for that many alternatives (vLLM's `logprobs`)."""
    asked, top = body.get("logprobs"), body.get("top_logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise LineError("body.logprobs", "logprobs must be true or false on /v1/chat/completions")
    if top is not None and asked is not True:
        raise LineError("body.top_logprobs", "top_logprobs needs logprobs: true")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise LineError("body.top_logprobs", "top_logprobs must be an integer from 0 to 20")
    return (top or 0) if asked else None


def completion_logprobs(body: dict) -> int | None:
    """OpenAI completions: `logprobs` is the number of alternatives per token, as in vLLM."""
    if "top_logprobs" in body:
        raise LineError("body.top_logprobs", "field 'top_logprobs' is not supported on /v1/completions (use logprobs)")
    asked = body.get("logprobs")
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or not 0 <= asked <= 20):
        raise LineError("body.logprobs", "logprobs must be an integer from 0 to 20 on /v1/completions")
    return asked


def structured_output(value: object) -> dict | None:
    """`response_format` as a StructuredOutput: json_schema → its schema, json_object → any JSON object, text → none."""
    if not isinstance(value, dict):
        raise LineError("body.response_format", "response_format must be an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema") if isinstance(value.get("json_schema"), dict | None) else None
        if not isinstance(schema, dict):
            raise LineError("body.response_format.json_schema.schema", "the JSON schema is missing or not an object")
        return {"json_schema": schema}
    raise LineError("body.response_format.type", f"type {kind!r} is not supported (json_schema, json_object or text)")


def vllm_structured_output(value: object) -> dict:
    """vLLM's `structured_outputs` body field ({json | json_object | regex | choice | grammar}) as a StructuredOutput."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in STRUCTURED_KINDS:
        raise LineError("body.structured_outputs", f"structured_outputs must hold one of {', '.join(STRUCTURED_KINDS)}")
    ((kind, spec),) = value.items()
    return {STRUCTURED_KINDS[kind]: spec}


def settable_sampling_field(field: str) -> bool:
    """Whether `field` is a vllm.SamplingParams field a line may set through `extra` (the installed vLLM's)."""
    from tasks.engines.installed import ENGINE_SET, sampling_fields

    installed = sampling_fields()
    return installed is not None and field in installed[1] and field not in ENGINE_SET


def chat_messages(messages: list) -> list:
    """Messages whose content is a list of parts, as text: text parts joined with newlines, as vLLM joins them.

    Anything this cannot read as {role, content} is left as it is, for the renderer to reject."""
    flat = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            flat.append(message)
            continue
        for key in message:
            if key not in ("role", "content"):
                raise LineError(f"body.messages[{index}].{key}", f"message field {key!r} is not supported")
        content = message.get("content")
        if isinstance(content, list):
            message = {
                **message,
                "content": "\n".join(part_text(part, f"body.messages[{index}].content[{i}]") for i, part in enumerate(content)),
            }
        flat.append(message)
    return flat


def part_text(part: object, field: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind in MEDIA_PARTS:
        media = "image" if "image" in kind else kind
        raise LineError(field, f"{media} content is not supported yet")
    if kind == "text":
        raise LineError(field, "a text part needs its text as a string")
    raise LineError(field, f"content part type {kind!r} is not supported")
