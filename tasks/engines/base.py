"""What every engine shares: the output record (and its Arrow schema), the Engine protocol, the
per-row sampling overrides, and the transient errors a shard is retried after."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import NewType, Protocol, TypedDict

import pyarrow as pa
from pydantic import ValidationError

from tasks.config import SamplingConfig, describe_errors

# A permanent error is the request's own answer (its prompt is too long, its schema invalid): stored
# and reused like any answer. A transient one (a timeout, a 429 or 5xx after every retry) is stored
# for the record, but the next run asks again.
PERMANENT = "permanent"
TRANSIENT = "transient"


# Logprobs are float32 in vLLM: stored as such, they lose nothing and take half the room.
Float32 = NewType("Float32", float)


class TopLogprob(TypedDict):
    """One of the most likely tokens at a place of the answer (or prompt)."""

    token: str | None  # the token's text as vLLM decodes it alone
    token_id: int | None  # None when a server does not say (the openai engine)
    logprob: Float32


class TokenLogprob(TypedDict):
    """One token of the answer (or prompt), its logprob, and the `logprobs` most likely tokens there, rank 1 first."""

    token: str | None
    token_id: int | None
    logprob: Float32 | None  # None for a prompt's first token, which nothing precedes
    top: list[TopLogprob]


@dataclass
class OutputRecord:
    """One answer (one sample of one request), or the error that stood in for it."""

    request_key: str
    sample_index: int = 0
    text: str | None = None
    finish_reason: str | None = None  # stop, length
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    mean_logprob: float | None = None  # mean over the completion's tokens; only when logprobs were asked
    latency_seconds: float | None = None  # queued to last token
    error_code: str | None = None  # context_length_exceeded, invalid_request, ...; None on success
    error: str | None = None
    error_kind: str | None = None  # PERMANENT or TRANSIENT; None on success
    # Per token, only when asked (`logprobs`, `prompt_logprobs`): a list column DuckDB queries (UNNEST) and exports.
    token_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    # With a reasoning parser (ModelConfig.reasoning_parser): `text` is the final answer and this the thinking before it.
    reasoning: str | None = None
    reasoning_tokens: int | None = None  # the completion's tokens before the answer (the thinking, markers included)
    text_tokens: int | None = None  # the answer's tokens (reasoning_tokens + text_tokens = completion_tokens)
    reasoning_truncated: bool | None = None  # finish_reason 'length' inside the thinking: the budget ran out before any answer

    @classmethod
    def failed(
        cls, request_key: str, code: str, message: str, prompt_tokens: int | None = None, kind: str = PERMANENT
    ) -> OutputRecord:
        return cls(request_key, prompt_tokens=prompt_tokens, error_code=code, error=message, error_kind=kind)


def arrow_type(hint: object) -> pa.DataType:
    """The Arrow type of a field annotated `T` or `T | None`: T a str, int, float, Float32, list[T] or a TypedDict of them."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [t for t in typing.get_args(hint) if t is not type(None)]
    if typing.get_origin(hint) is list:
        return pa.list_(arrow_type(typing.get_args(hint)[0]))
    if typing.is_typeddict(hint):
        return pa.struct([(name, arrow_type(field)) for name, field in typing.get_type_hints(hint).items()])
    return {str: pa.string(), int: pa.int32(), float: pa.float64(), Float32: pa.float32(), bool: pa.bool_()}[hint]


# The output files' schema, derived from the record so the two cannot drift apart.
OUTPUT_SCHEMA = pa.schema([(name, arrow_type(hint)) for name, hint in typing.get_type_hints(OutputRecord).items()])


# Lists per token: scorers read none of them, and Arrow's joins take none.
PER_TOKEN_COLUMNS = ("token_logprobs", "prompt_logprobs")


def output_table(records: list[OutputRecord]) -> pa.Table:
    return pa.Table.from_pylist([record.__dict__ for record in records], schema=OUTPUT_SCHEMA)


def conformed(outputs: pa.Table) -> pa.Table:
    """Output rows in OUTPUT_SCHEMA: a file written before a field existed has it null."""
    columns = {
        field.name: outputs[field.name] if field.name in outputs.column_names else pa.nulls(outputs.num_rows, field.type)
        for field in OUTPUT_SCHEMA
    }
    return pa.table(columns).cast(OUTPUT_SCHEMA)


@dataclass
class GenerateResult:
    outputs: pa.Table  # OUTPUT_SCHEMA
    seconds: float  # engine seconds spent on these requests
    batch_size: int  # requests per engine submission
    max_num_seqs: int | None  # the engine's batch limit at the end (lowered after an out-of-memory); None for openai
    engine_load_seconds: float = 0.0  # how long the process's first shard waited for the engine to start


class Engine(Protocol):
    """Turns a shard's requests (request_key, prompt, messages, overrides) into OutputRecords.

    A request that cannot run on its own becomes an error record; the shard goes on. `key` names the
    shard's work (its output key), so an engine can remember what a failed attempt taught it.
    """

    def generate(self, requests: pa.Table, sampling: SamplingConfig, key: str) -> GenerateResult: ...


def request_sampling(base: SamplingConfig, overrides: str | None) -> SamplingConfig:
    """The run's sampling with a row's overrides (a JSON object of SamplingConfig fields) applied.

    A row's `extra` and `chat_template_kwargs` add to the run's; with max_tokens_wins the run's max_tokens
    stands over a row's own.
    """
    if not overrides:
        return base
    try:
        values = json.loads(overrides)
        if not isinstance(values, dict):
            raise ValueError("overrides must be a JSON object")
        if base.max_tokens_wins:
            values.pop("max_tokens", None)
        for added in ("extra", "chat_template_kwargs"):
            if getattr(base, added) and isinstance(values.get(added), dict):
                values[added] = {**getattr(base, added), **values[added]}
        return SamplingConfig.model_validate({**base.model_dump(), **values})
    except ValidationError as error:
        raise ValueError(f"invalid sampling override: {describe_errors(error)}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"overrides are not JSON: {error}") from error


def prompt_token_ids(tokenizer, prompt: str | None, messages: str | None, chat_template_kwargs: dict | None = None) -> list[int]:
    """A request's prompt as the engine sends it: chat messages through the model's chat template (given
    `chat_template_kwargs` as more variables, as LLM.chat gives them), or the prompt as is."""
    if messages is not None:
        return list(
            tokenizer.apply_chat_template(
                json.loads(messages), add_generation_prompt=True, tokenize=True, return_dict=False, **(chat_template_kwargs or {})
            )
        )
    return list(tokenizer.encode(prompt))


def request_columns(requests: pa.Table) -> zip:
    """(request_key, prompt, messages, overrides) per request; overrides may be absent from a table."""
    overrides = requests["overrides"].to_pylist() if "overrides" in requests.column_names else [None] * requests.num_rows
    return zip(requests["request_key"].to_pylist(), requests["prompt"].to_pylist(), requests["messages"].to_pylist(), overrides)


class EngineFailed(RuntimeError):
    """Transient: the engine could not be kept running (it hung again, ran out of memory at its
    smallest batch, or died too often in a row); a retry starts a new one."""


class ServerUnreachable(RuntimeError):
    """Transient: the server took no connection; the shard is retried, then the run fails (no error rows)."""


class EngineRestarted(RuntimeError):
    """Transient: the engine this shard prepared for was closed (crashed or swapped); the retry uses the new one."""
