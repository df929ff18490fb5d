"""Render: each source row becomes a request (custom_id, prompt or chat messages, overrides, request_key)."""

from __future__ import annotations

import json

import jinja2.sandbox
import pyarrow as pa
from pydantic import ValidationError

from tasks.config import DatasetSpec, Mode, SamplingOverrides, describe_errors
from tasks.keys import content_hash
from tasks.prepare.sources import REJECTED_SCHEMA, SourceBatch, validated_columns
from tasks.redact import redact

REQUEST_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("request_key", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.string()),  # JSON list of {role, content}; null in completion mode
        ("overrides", pa.string()),  # JSON object of per-request sampling parameters; null when none
        ("reference", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        # Working columns for validation, dedupe and sharding (not stored in DuckDB):
        ("dedupe_text", pa.string()),  # the content as plain text, so normalization can see its whitespace
        ("approx_tokens", pa.int64()),  # characters / 4: cheap, and close enough for budgets
        ("roles", pa.string()),  # JSON list of the message roles, for the allowed-roles expectation
    ]
)


def request_content(
    prompt: str | None,
    system_prompt: str | None,
    mode: Mode,
    messages: list[dict] | None = None,
    overrides: dict | None = None,
) -> dict:
    """What is sent to the model; request_key is the hash of exactly this."""
    if mode == "completion":
        content: dict = {"prompt": f"{system_prompt}\n\n{prompt}" if system_prompt else prompt}
    else:
        has_system = bool(messages) and messages[0].get("role") == "system"
        system = [{"role": "system", "content": system_prompt}] if system_prompt and not has_system else []
        content = {"messages": [*system, *(messages or [{"role": "user", "content": prompt}])]}
    if overrides:
        content["overrides"] = overrides
    return content


def conversation(prompt: str | None, messages: str | None) -> list[dict]:
    """A stored request as chat messages: its messages (JSON), or its prompt as one user turn."""
    return json.loads(messages) if messages else [{"role": "user", "content": prompt or ""}]


def escape(text: str) -> str:
    return text.replace("\x7f", "\x7f\x7f")


def dedupe_text(content: dict) -> str:
    """The content as one text for dedupe: one that no other content flattens to.

    DEL (0x7f) is doubled inside role and content; DEL and one more character mark the parts
    (":" ends a role, ";" a message, "=" starts the overrides), so one message can never read as
    two. Neither NFKC nor whitespace folding changes DEL or the marks, and the mark is followed by
    a space: folding trims each message (" hi " and "hi" compare equal) and nothing composes with
    the mark. Every character is ASCII or the text's own, so the exact dedupe's fast path holds.
    """
    if "messages" in content:
        text = "".join(f"{escape(m['role'])}\x7f: {escape(m['content'])} \x7f;" for m in content["messages"])
    else:
        text = escape(content["prompt"])
    return text + overrides_mark(content)


def overrides_mark(content: dict) -> str:
    """The overrides' part of the dedupe text (empty when there are none)."""
    return "\x7f= " + json.dumps(content["overrides"], sort_keys=True) if "overrides" in content else ""


def approx_tokens(text: str, content: dict) -> int:
    """The prompt's tokens as characters / 4 of its dedupe text: its overrides (a long logit_bias, a JSON schema) are not prompt."""
    return -(-(len(text) - len(overrides_mark(content))) // 4)


def roles_json(roles: list[str]) -> str:
    """The roles as the allowed-roles expectation matches them: JSON quotes each, so a role holding a comma stays one role."""
    return json.dumps(roles, ensure_ascii=False, separators=(",", ":"))


class RowError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field


def as_text(value: object, field: str) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RowError(field, f"invalid UTF-8 at byte {error.start}") from error
    return value


def parse_messages(value: object, field: str) -> list[dict] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        try:
            value = json.loads(as_text(value, field))
        except ValueError as error:
            raise RowError(field, f"messages are not valid JSON ({error})") from error
        except RecursionError as error:
            raise RowError(field, "messages are nested too deeply") from error
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    )
    if not ok:
        raise RowError(field, "messages must be a non-empty list of {role, content} with text values")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def json_object(value: object, field: str, what: str) -> dict:
    """A row's JSON object: JSON text, a struct (nulls are fields it leaves unset) or a map."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(as_text(value, field))
        except ValueError as error:
            raise RowError(field, f"{what} is not valid JSON ({error})") from error
        if not isinstance(value, dict):
            raise RowError(field, f"{what} must be a JSON object, not {type(value).__name__}")
        return value
    if isinstance(value, list) and all(isinstance(item, tuple) and len(item) == 2 for item in value):
        value = dict(value)  # a Parquet map
    if not isinstance(value, dict):
        raise RowError(field, f"{what} must be a JSON object, not {type(value).__name__}")
    return without_nulls(value)


def without_nulls(value: object) -> object:
    """A struct column's nulls are fields a row does not set (a JSON schema's own nulls stay: it is read as text)."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    return value


def structured_value(kind: str, value: object, field: str) -> object:
    """A structured-output column's value: a schema or choices may be JSON text; a regex or grammar is the text itself."""
    if kind in ("regex", "grammar"):
        return as_text(value, field)
    if isinstance(value, str | bytes):
        try:
            return json.loads(as_text(value, field))
        except ValueError as error:
            raise RowError(field, f"{kind} is not valid JSON ({error})") from error
    return without_nulls(value) if kind == "json_schema" else value


class Renderer:
    """Turns source batches into request and rejected-row tables (no I/O)."""

    def __init__(self, spec: DatasetSpec, mode: Mode):
        self.spec = spec
        self.mode = mode
        environment = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)
        self.template = environment.from_string(spec.prompt_template) if spec.prompt_template else None
        self.openai = spec.format == "openai_batch"
        self.id_field = "custom_id" if self.openai else spec.id_column
        self.prompt_field = "prompt" if self.openai else (spec.prompt_column or "prompt_template")
        self.messages_field = "messages" if self.openai else spec.messages_column
        self.source_columns = validated_columns(spec)  # passed through for validation, then dropped

    def prompt_of(self, row: dict) -> str | None:
        if self.template is not None:
            try:
                return self.template.render(**row)
            except jinja2.TemplateError as error:
                raise RowError(self.prompt_field, f"template error: {error}") from error
            except Exception as error:  # the template's own code failing on this row: None + '!', 1 / 0, ...
                raise RowError(self.prompt_field, f"template error: {type(error).__name__}: {error}") from error
        if self.messages_field and row.get(self.messages_field) is not None:
            return None
        prompt = as_text(row.get(self.prompt_field), self.prompt_field)
        if prompt is None or not prompt.strip():
            raise RowError(self.prompt_field, "prompt is null" if prompt is None else "prompt is empty")
        return prompt

    def overrides_of(self, row: dict) -> dict:
        if "overrides" in row and (self.openai or self.spec.format == "jsonl"):
            raw = json.loads(row["overrides"]) if row["overrides"] else {}
        else:
            raw = {c: row[c] for c in self.spec.override_columns if row.get(c) is not None}
        column = self.spec.sampling_column
        if column and row.get(column) is not None:
            raw |= json_object(row[column], column, "sampling")
        for kind, column in (self.spec.structured_columns or {}).items():
            if row.get(column) is None:
                continue
            if "structured" in raw:
                raise RowError(column, f"a second structured output for this row (it already has {sorted(raw['structured'])})")
            raw["structured"] = {kind: structured_value(kind, row[column], column)}
        try:
            return SamplingOverrides.model_validate(raw).model_dump(exclude_none=True)
        except ValidationError as error:
            location = error.errors()[0]["loc"]
            raise RowError(
                self.override_field(str(location[0])) if location else "overrides", f"sampling override: {describe_errors(error)}"
            ) from error

    def override_field(self, field: str) -> str:
        """The column a bad override came from: its own column, or the sampling column that holds it."""
        if field in self.spec.override_columns or self.openai:
            return field
        if field == "structured" and self.spec.structured_columns:
            return ", ".join(self.spec.structured_columns.values())
        return f"{self.spec.sampling_column}.{field}" if self.spec.sampling_column else field

    def request_of(self, row: dict, custom_id: str | None) -> dict:
        prompt = self.prompt_of(row)
        messages = parse_messages(row.get(self.messages_field), self.messages_field) if self.messages_field else None
        if prompt is None and messages is None:
            raise RowError(self.prompt_field, "prompt is null")
        if messages is not None and self.mode == "completion":
            raise RowError(self.messages_field, "chat messages need the model's chat mode (mode: chat)")
        # An OpenAI /v1/completions line sends its prompt as it is, whatever the model's mode, as OpenAI and vLLM do.
        mode = "completion" if self.openai and messages is None else self.mode
        content = request_content(prompt, self.spec.system_prompt, mode, messages, self.overrides_of(row))
        reference = (
            as_text(row.get(self.spec.reference_column), self.spec.reference_column) if self.spec.reference_column else None
        )
        reference = None if reference is None else str(reference)  # a numeric answer compares as text
        request_key = content_hash(content)
        text = dedupe_text(content)
        return {
            "custom_id": custom_id or f"row-{request_key[:20]}",
            "request_key": request_key,
            "prompt": content.get("prompt", prompt),
            "messages": json.dumps(content["messages"], ensure_ascii=False) if "messages" in content else None,
            "overrides": json.dumps(content["overrides"], sort_keys=True) if "overrides" in content else None,
            "reference": reference,
            "dedupe_text": text,
            "approx_tokens": approx_tokens(text, content),
            "roles": roles_json([m["role"] for m in content["messages"]]) if "messages" in content else None,
        }

    def render(self, source: SourceBatch) -> tuple[pa.Table, pa.Table]:
        """(requests, with the source columns the expectations name; rejected rows)."""
        requests: list[dict] = []
        rendered_rows: list[int] = []
        rejected: list[dict] = list(source.rejected)
        source_file = redact(source.file)  # stored with every request: a URL's credentials are not
        for offset, row in enumerate(source.batch.to_pylist()):
            line = row.pop("__line", None)
            location = {"source_file": source_file, "source_row": source.first_row + offset if line is None else line}
            custom_id = None
            if self.id_field:
                try:
                    raw_id = as_text(row.get(self.id_field), self.id_field)
                except RowError as error:
                    rejected.append({**location, "custom_id": None, "field": error.field, "reason": str(error)})
                    continue
                custom_id = None if raw_id is None else str(raw_id)
                if custom_id is None or not custom_id.strip():
                    rejected.append({**location, "custom_id": custom_id, "field": self.id_field, "reason": "id is null or empty"})
                    continue
            try:
                requests.append({**location, **self.request_of(row, custom_id)})
                rendered_rows.append(offset)
            except RowError as error:
                rejected.append({**location, "custom_id": custom_id, "field": error.field, "reason": str(error)})
        table = pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA)
        for column in self.source_columns:
            table = table.append_column(column, source.batch.column(column).take(pa.array(rendered_rows, pa.int64())))
        return table, pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA)
