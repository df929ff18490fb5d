"""Export: a run (or any filtered set of outputs) to Parquet, chat JSONL and the OpenAI batch file format."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Literal

import duckdb
from prefect import task
from pydantic import BaseModel, ConfigDict, model_validator

from tasks import files
from tasks.config import SpecError, StoreConfig
from tasks.render import content_hash
from tasks.store import connect, migrate

# --- the OpenAI batch output format (one JSON object per line of the output and error files) ------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatChoice(Strict):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


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
    logprobs: None = None


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


# --- selection -----------------------------------------------------------------------------------

EXPORT_COLUMNS = """
    ro.run_id, r.model, r.dataset_name, ro.dataset_version, ro.custom_id, ro.duplicate_of, ro.sample_index,
    q.prompt, q.messages, q.reference, q.source_file, q.source_row, ro.text, ro.finish_reason,
    ro.prompt_tokens, ro.completion_tokens, ro.error_code, ro.error, ro.output_id, ro.produced_by_run_id,
    o.shard_key, epoch(o.created_at)::BIGINT AS created
"""


def selection_sql(run_id: str | None, where: str | None) -> tuple[str, dict]:
    """The outputs to export: one run's, or the newest per input row and model; narrowed by `where`.

    `where` is a SQL condition over the columns above (e.g. `finish_reason = 'stop' AND output_id IN
    (SELECT output_id FROM scores WHERE scorer = 'judge' AND value >= 8)`).
    """
    sql = f"""
        SELECT * FROM (
            SELECT {EXPORT_COLUMNS}
            FROM run_outputs ro
            JOIN runs r ON r.run_id = ro.run_id
            JOIN requests q ON q.dataset_version = ro.dataset_version AND q.custom_id = ro.custom_id
            JOIN outputs o ON o.output_id = ro.output_id
            WHERE ro.run_id = $run OR $run IS NULL
            QUALIFY $run IS NOT NULL OR row_number() OVER (
                PARTITION BY r.dataset_name, ro.custom_id, r.model, ro.sample_index
                ORDER BY r.started_at DESC, r.run_id DESC) = 1
        )
        WHERE {where or "true"}
        ORDER BY dataset_name, model, custom_id, sample_index
    """
    return sql, {"run": run_id}


def selection(con: duckdb.DuckDBPyConnection, run_id: str | None, where: str | None) -> duckdb.DuckDBPyRelation:
    sql, params = selection_sql(run_id, where)
    try:
        return con.sql(sql, params=params)
    except duckdb.Error as error:
        raise SpecError(f"export filter {where!r}: {error}") from error


def iter_rows(con: duckdb.DuckDBPyConnection, run_id: str | None, where: str | None) -> Iterator[dict]:
    """Rows in bounded batches: an export of millions of outputs never sits in memory at once."""
    reader = selection(con, run_id, where).to_arrow_reader(batch_size=10_000)
    for batch in reader:
        yield from batch.to_pylist()


def check_run(con: duckdb.DuckDBPyConnection, run_id: str | None) -> None:
    if run_id is not None and not con.execute("SELECT run_id FROM runs WHERE run_id = ?", [run_id]).fetchall():
        raise SpecError(f"run {run_id}: not in this results file")


# --- formats (pure: rows in, lines out) ----------------------------------------------------------


def chat_example(row: dict) -> ChatExample:
    messages = json.loads(row["messages"]) if row["messages"] else [{"role": "user", "content": row["prompt"]}]
    return ChatExample(messages=[*messages, {"role": "assistant", "content": row["text"]}])


def batch_line(samples: list[dict]) -> BatchOutputLine:
    """All samples of one request (sample_index 0..n-1) as one line, like an OpenAI response with n choices."""
    first = samples[0]
    line_id = f"batch_req_{content_hash([first['run_id'], first['custom_id']])}"
    if first["error_code"] is not None:
        return BatchOutputLine(
            id=line_id, custom_id=first["custom_id"], response=None,
            error=BatchError(code=first["error_code"], message=first["error"] or first["error_code"]),
        )  # fmt: skip
    chat = first["messages"] is not None
    choices = [
        ChatChoice(
            index=s["sample_index"],
            message=AssistantMessage(role="assistant", content=s["text"]),
            finish_reason=s["finish_reason"],
        )
        if chat
        else CompletionChoice(index=s["sample_index"], text=s["text"], finish_reason=s["finish_reason"])
        for s in samples
    ]
    completion_tokens = sum(s["completion_tokens"] for s in samples)
    usage = Usage(prompt_tokens=first["prompt_tokens"], completion_tokens=completion_tokens,
                  total_tokens=first["prompt_tokens"] + completion_tokens)  # fmt: skip
    body_type, kind = (ChatCompletion, "chat.completion") if chat else (Completion, "text_completion")
    body = body_type(id=f"cmpl-{first['output_id']}", object=kind, created=first["created"], model=first["model"],
                     choices=choices, usage=usage)  # fmt: skip
    return BatchOutputLine(
        id=line_id, custom_id=first["custom_id"], error=None,
        response=BatchResponse(status_code=200, request_id=f"req_{first['output_id']}", body=body),
    )  # fmt: skip


def group_samples(rows: Iterable[dict]) -> Iterator[list[dict]]:
    """Consecutive rows of one request (the selection is ordered by it) form one line."""
    key = lambda row: (row["dataset_name"], row["model"], row["run_id"], row["custom_id"])  # noqa: E731
    for _, samples in itertools.groupby(rows, key=key):
        yield list(samples)


def to_json_line(model: BaseModel) -> str:
    return model.model_dump_json() + "\n"


# --- tasks ---------------------------------------------------------------------------------------


class ExportFile(BaseModel):
    format: str
    path: str
    lines: int


def open_store(store: StoreConfig) -> duckdb.DuckDBPyConnection:
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    migrate(con)
    return con


@task(name="write-parquet-export")
def write_parquet_export(store: StoreConfig, run_id: str | None, where: str | None, path: str) -> ExportFile:
    con = open_store(store)
    try:
        check_run(con, run_id)
        partial = f"{path}.partial"
        files.make_parent(path)
        selection(con, run_id, where).write_parquet(partial, compression="zstd")
        count = con.execute("SELECT count(*) FROM read_parquet(?)", [partial]).fetchone()[0]
    finally:
        con.close()
    files.move(partial, path)
    return ExportFile(format="parquet", path=path, lines=count)


@task(name="write-chat-jsonl")
def write_chat_jsonl(store: StoreConfig, run_id: str | None, where: str | None, path: str) -> ExportFile:
    """Successful answers to canonical requests (a duplicate would repeat a training example)."""
    con = open_store(store)
    lines = 0
    try:
        check_run(con, run_id)
        with files.atomic_writer(path, "w") as handle:
            for row in iter_rows(con, run_id, where):
                if row["error_code"] is None and row["duplicate_of"] is None:
                    handle.write(to_json_line(chat_example(row)))
                    lines += 1
    finally:
        con.close()
    return ExportFile(format="chat_jsonl", path=path, lines=lines)


@task(name="write-openai-batch-files")
def write_openai_batch_files(
    store: StoreConfig, run_id: str | None, where: str | None, output_path: str, error_path: str
) -> list[ExportFile]:
    """Every input row (duplicates too, as in an OpenAI batch) to the output file or the error file."""
    con = open_store(store)
    counts = {"output": 0, "error": 0}
    try:
        check_run(con, run_id)
        with files.atomic_writer(output_path, "w") as output, files.atomic_writer(error_path, "w") as errors:
            for samples in group_samples(iter_rows(con, run_id, where)):
                line = batch_line(samples)
                kind = "output" if line.error is None else "error"
                (output if kind == "output" else errors).write(to_json_line(line))
                counts[kind] += 1
    finally:
        con.close()
    return [
        ExportFile(format="openai_batch_output", path=output_path, lines=counts["output"]),
        ExportFile(format="openai_batch_errors", path=error_path, lines=counts["error"]),
    ]
