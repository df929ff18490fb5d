"""Render: each source row becomes a request (custom_id, prompt or chat messages, request_key)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import jinja2.sandbox
import pyarrow as pa

from tasks.config import DatasetSpec
from tasks.load import SourceBatch

Mode = Literal["chat", "completion"]

REQUEST_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("request_key", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.string()),  # JSON list of {role, content}; null in completion mode
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("reference", pa.string()),  # the reference answer, when the spec names a reference column
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("custom_id", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
    ]
)


def content_hash(value: object) -> str:
    """A stable 32-hex-digit hash of any JSON-serializable value."""
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def template_hash(spec: DatasetSpec, mode: Mode) -> str:
    return content_hash(
        {"column": spec.prompt_column, "template": spec.prompt_template, "system": spec.system_prompt, "mode": mode}
    )


def request_content(prompt: str, system_prompt: str | None, mode: Mode) -> dict:
    """What is sent to the model; request_key is the hash of exactly this."""
    if mode == "completion":
        return {"prompt": f"{system_prompt}\n\n{prompt}" if system_prompt else prompt}
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {"messages": [*messages, {"role": "user", "content": prompt}]}


class Renderer:
    """Turns source batches into request and rejected-row tables (no I/O)."""

    def __init__(self, spec: DatasetSpec, mode: Mode):
        self.spec = spec
        self.mode = mode
        environment = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)
        self.template = environment.from_string(spec.prompt_template) if spec.prompt_template else None

    def prompt_of(self, row: dict) -> str | None:
        if self.template is None:
            return row[self.spec.prompt_column]
        return self.template.render(**row)

    def reference_of(self, row: dict) -> str | None:
        value = row[self.spec.reference_column] if self.spec.reference_column else None
        return None if value is None else str(value)

    def render(self, source: SourceBatch) -> tuple[pa.Table, pa.Table]:
        requests: list[dict] = []
        rejected: list[dict] = []
        prompt_field = self.spec.prompt_column or "prompt_template"
        for offset, row in enumerate(source.batch.to_pylist()):
            location = {"source_file": source.file, "source_row": source.first_row + offset}
            raw_id = row[self.spec.id_column]
            custom_id = None if raw_id is None else str(raw_id)
            if custom_id is None or not custom_id.strip():
                rejected.append({**location, "custom_id": custom_id, "field": self.spec.id_column, "reason": "id is null or empty"})
                continue
            try:
                prompt = self.prompt_of(row)
            except jinja2.TemplateError as error:
                rejected.append({**location, "custom_id": custom_id, "field": prompt_field, "reason": f"template error: {error}"})
                continue
            if prompt is None or not prompt.strip():
                reason = "prompt is null" if prompt is None else "prompt is empty"
                rejected.append({**location, "custom_id": custom_id, "field": prompt_field, "reason": reason})
                continue
            content = request_content(prompt, self.spec.system_prompt, self.mode)
            requests.append(
                {
                    **location,
                    "custom_id": custom_id,
                    "request_key": content_hash(content),
                    "prompt": content.get("prompt", prompt),
                    "messages": json.dumps(content["messages"], ensure_ascii=False) if "messages" in content else None,
                    "reference": self.reference_of(row),
                }
            )
        return (
            pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA),
            pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA),
        )
