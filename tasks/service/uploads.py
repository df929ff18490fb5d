"""Batch files in: an upload checked line by line as it streams to disk, and a batch's lines split by model.

A file that fails any check is refused whole, naming its first bad line, and nothing of it is kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO

from tasks.service.objects import ENDPOINTS, ApiError


class UploadCheck:
    """The checks of an OpenAI batch file, fed one line at a time (1-based line numbers in every error)."""

    def __init__(self, max_line_bytes: int, max_lines: int):
        self.max_line_bytes, self.max_lines = max_line_bytes, max_lines
        self.lines = 0
        self.first_line_of: dict[str, int] = {}

    def refuse(self, number: int, message: str, code: str) -> ApiError:
        return ApiError(400, f"line {number}: {message}", "file", code)

    def line(self, raw: bytes) -> None:
        number = self.lines + 1
        if len(raw) > self.max_line_bytes:
            raise self.refuse(number, f"{len(raw)} bytes, over the limit of {self.max_line_bytes}", "line_too_long")
        if not raw.strip():
            raise self.refuse(number, "empty line (a batch file has one JSON request per line)", "invalid_json_line")
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise self.refuse(number, f"not UTF-8 (byte {error.start})", "invalid_encoding") from None
        except json.JSONDecodeError as error:
            raise self.refuse(number, f"not JSON ({error.msg}, column {error.colno})", "invalid_json_line") from None
        if not isinstance(record, dict):
            raise self.refuse(number, "not a JSON object", "invalid_json_line")
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise self.refuse(number, "custom_id missing or not a string", "missing_custom_id")
        if custom_id in self.first_line_of:
            first = self.first_line_of[custom_id]
            raise self.refuse(number, f"custom_id {custom_id!r} repeats line {first}", "duplicate_custom_id")
        if record.get("method") != "POST":
            raise self.refuse(number, f"method {record.get('method')!r}: only POST", "invalid_method")
        if record.get("url") not in ENDPOINTS:
            raise self.refuse(number, f"url {record.get('url')!r} is not supported (only {', '.join(ENDPOINTS)})", "invalid_url")
        body = record.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise self.refuse(number, "body missing, or body.model missing", "missing_model")
        self.first_line_of[custom_id] = number
        self.lines = number
        if self.lines > self.max_lines:
            raise self.refuse(number, f"more than {self.max_lines} lines in one batch file", "too_many_lines")


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (without their newline) of a byte stream that arrives in chunks."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        yield from lines
    if rest:
        yield rest


def copy_checked(source: IO[bytes], target: IO[bytes], check: UploadCheck, max_bytes: int) -> int:
    """Stream an upload to `target`, every line checked on the way; returns its size in bytes."""
    size = 0

    def chunks() -> Iterator[bytes]:
        nonlocal size
        while chunk := source.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"file is larger than the limit of {max_bytes} bytes", "file", "file_too_large")
            yield chunk

    for raw in split_lines(chunks()):
        check.line(raw.removesuffix(b"\r"))
        target.write(raw + b"\n")
    if check.lines == 0:
        raise ApiError(400, "the file has no lines", "file", "empty_file")
    return size


def batch_lines(path: str) -> Iterator[tuple[bytes, str, str, str]]:
    """(raw line, custom_id, url, model) of each line of a checked upload."""
    with open(path, "rb") as handle:
        for raw in handle:
            record = json.loads(raw)
            yield raw, record["custom_id"], record["url"], record["body"]["model"]


def check_batch_file(path: str, endpoint: str, known_models: Iterable[str]) -> tuple[str | None, list[dict], int]:
    """The model a batch runs, the errors that fail it as a whole (OpenAI's `errors.data`), and how
    many of its lines name a model the server does not know (they go to the error file)."""
    known = set(known_models)
    errors: list[dict] = []
    models: dict[str, int] = {}
    unknown = 0
    for number, (_, _, url, model) in enumerate(batch_lines(path), start=1):
        if url != endpoint and len(errors) < 10:
            errors.append(
                {
                    "code": "mismatched_endpoint",
                    "message": f"url {url} is not the batch's endpoint {endpoint}",
                    "param": "url",
                    "line": number,
                }
            )
        if model in known:
            models.setdefault(model, number)
        else:
            unknown += 1
    if len(models) > 1:
        named = ", ".join(f"{model!r} (first on line {line})" for model, line in models.items())
        errors.append(
            {
                "code": "mixed_models",
                "message": f"a batch runs one model; the lines name {named}",
                "param": "body.model",
                "line": None,
            }
        )
    return (next(iter(models), None), errors, unknown)
