"""Export formats: chat fine-tuning lines and the OpenAI batch output format, each line validated by a model of it."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.config import unset
from tasks.keys import content_hash
from tasks.prepare.render import conversation

# --- the OpenAI batch output format (one JSON object per line of the output and error files) ------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompletionTokensDetails(Strict):
    reasoning_tokens: int


class Usage(Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # a reasoning model's thinking tokens (only then: other lines stay as they were)
    completion_tokens_details: CompletionTokensDetails | None = Field(None, exclude_if=unset)


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    reasoning: str | None = Field(None, exclude_if=unset)  # the thinking, as vllm serve --reasoning-parser returns it


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]

# JSON has no -inf: a token the sampling ruled out gets vLLM's (and OpenAI's) floor instead.
LOGPROB_FLOOR = -9999.0


class TopLogprob(Strict):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(Strict):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Strict):
    """A chat choice's `logprobs`: each token of the answer with its `top_logprobs` most likely ones."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(Strict):
    """A completion choice's `logprobs`: parallel lists; each place's map holds the chosen token and the top ones."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(Strict):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Strict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(Strict):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class Completion(Strict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class BatchResponse(Strict):
    status_code: int
    request_id: str
    body: ChatCompletion | Completion


class BatchError(Strict):
    code: str
    message: str


class BatchOutputLine(Strict):
    """One line of an OpenAI batch output file (response set) or error file (error set)."""

    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchError | None

    @model_validator(mode="after")
    def _response_or_error(self) -> BatchOutputLine:
        if (self.response is None) == (self.error is None):
            raise ValueError("exactly one of response and error is set")
        return self


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatExample(Strict):
    """One line of a chat fine-tuning file: the conversation ending in the model's answer."""

    messages: list[ChatMessage]

    @model_validator(mode="after")
    def _ends_with_the_answer(self) -> ChatExample:
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("the last message is the assistant's answer")
        return self


# --- formats (pure: rows in, lines out) ----------------------------------------------------------


def chat_example(row: dict) -> ChatExample:
    return ChatExample(messages=[*conversation(row["prompt"], row["messages"]), {"role": "assistant", "content": row["text"]}])


def batch_line(samples: list[dict]) -> BatchOutputLine:
    """All samples of one request (sample_index 0..n-1) as one line, like an OpenAI response with n choices."""
    first = samples[0]
    if first["error_code"] is not None:
        return error_line(first["run_id"], first["custom_id"], first["error_code"], first["error"] or first["error_code"])
    line_id = f"batch_req_{content_hash([first['run_id'], first['custom_id']])}"
    chat = first["messages"] is not None
    # token_logprobs are stored only when the line (or its run) asked for logprobs: then they are returned
    choices = [
        ChatChoice(
            index=s["sample_index"],
            message=AssistantMessage(role="assistant", content=s["text"], reasoning=s.get("reasoning")),
            finish_reason=s["finish_reason"],
            logprobs=chat_logprobs(s["token_logprobs"]) if s.get("token_logprobs") is not None else None,
        )
        if chat
        else CompletionChoice(
            index=s["sample_index"],
            text=s["text"],
            finish_reason=s["finish_reason"],
            logprobs=completion_logprobs(s["token_logprobs"]) if s.get("token_logprobs") is not None else None,
        )
        for s in samples
    ]
    completion_tokens = sum(s["completion_tokens"] for s in samples)
    reasoning_tokens = [s.get("reasoning_tokens") for s in samples]
    usage = Usage(
        prompt_tokens=first["prompt_tokens"],
        completion_tokens=completion_tokens,
        total_tokens=first["prompt_tokens"] + completion_tokens,
        completion_tokens_details=(
            CompletionTokensDetails(reasoning_tokens=sum(reasoning_tokens)) if None not in reasoning_tokens else None
        ),
    )
    body_type, kind = (ChatCompletion, "chat.completion") if chat else (Completion, "text_completion")
    body = body_type(
        id=f"cmpl-{first['output_id']}", object=kind, created=first["created"], model=first["model"], choices=choices, usage=usage
    )
    return BatchOutputLine(
        id=line_id,
        custom_id=first["custom_id"],
        error=None,
        response=BatchResponse(status_code=200, request_id=f"req_{first['output_id']}", body=body),
    )


def token_text(token: str | None) -> str:
    return token or ""


def utf8(token: str | None) -> list[int]:
    return list(token_text(token).encode("utf-8", errors="replace"))


def floored(logprob: float | None) -> float:
    return LOGPROB_FLOOR if logprob is None else max(logprob, LOGPROB_FLOOR)


def chat_logprobs(tokens: list[dict]) -> ChatLogprobs:
    """Stored token logprobs as a chat choice's `logprobs` (OpenAI's shape, `bytes` the token's UTF-8)."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=token_text(t["token"]),
                logprob=floored(t["logprob"]),
                bytes=utf8(t["token"]),
                top_logprobs=[
                    TopLogprob(token=token_text(a["token"]), logprob=floored(a["logprob"]), bytes=utf8(a["token"]))
                    for a in t["top"]
                ],
            )
            for t in tokens
        ]
    )


def completion_logprobs(tokens: list[dict]) -> CompletionLogprobs:
    """Stored token logprobs as a completion choice's `logprobs`: as OpenAI and vLLM do, each place's map holds the
    chosen token and the top ones (up to logprobs + 1), and text_offset is where each token starts in the text."""
    texts = [token_text(t["token"]) for t in tokens]
    offsets = list(itertools.accumulate((len(text) for text in texts[:-1]), initial=0)) if texts else []
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[floored(t["logprob"]) for t in tokens],
        top_logprobs=[
            {token_text(t["token"]): floored(t["logprob"]), **{token_text(a["token"]): floored(a["logprob"]) for a in t["top"]}}
            for t in tokens
        ],
        text_offset=offsets,
    )


def error_line(run_id: str, custom_id: str, code: str, message: str) -> BatchOutputLine:
    """A line of the error file: a request that has no answer, and why."""
    line_id = f"batch_req_{content_hash([run_id, custom_id])}"
    return BatchOutputLine(id=line_id, custom_id=custom_id, response=None, error=BatchError(code=code, message=message))


def group_samples(rows: Iterable[dict]) -> Iterator[list[dict]]:
    """Consecutive rows of one request (the selection is ordered by it) form one line."""
    key = lambda row: (row["dataset_name"], row["model"], row["run_id"], row["custom_id"])  # noqa: E731
    for _, samples in itertools.groupby(rows, key=key):
        yield list(samples)


def to_json_line(model: BaseModel) -> str:
    return model.model_dump_json() + "\n"
