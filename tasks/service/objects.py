"""The OpenAI objects the Batch API returns — files, batches, errors — as plain dicts of OpenAI's shape (pure)."""

from __future__ import annotations

import re
import secrets
import time

PRIORITIES = {"high": 0, "normal": 1, "low": 2}  # metadata.priority → the queue's order (lower runs first)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
ENDED = ("completed", "failed", "expired", "cancelled")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def file_object(file_id: str, filename: str, size: int, purpose: str) -> dict:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": now(),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def window_seconds(window: str) -> int:
    """`24h` (OpenAI's one value), or any `<number>s|m|h` — a short window is how a test sees expiry."""
    match = re.fullmatch(r"(\d+)([smh])", window or "")
    if not match or int(match[1]) == 0:
        raise ApiError(400, f"completion_window {window!r} is not a duration like 24h, 30m or 90s", "completion_window")
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


def batch_object(input_file_id: str, endpoint: str, window: str, metadata: dict | None, total: int) -> dict:
    if endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint {endpoint!r} is not supported (only {', '.join(ENDPOINTS)})", "endpoint")
    priority = (metadata or {}).get("priority", "normal")
    if priority not in PRIORITIES:
        raise ApiError(400, f"metadata.priority {priority!r} is not one of {', '.join(PRIORITIES)}", "metadata")
    created = now()
    return {
        "id": new_id("batch_"),
        "object": "batch",
        "endpoint": endpoint,
        "model": None,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created,
        "in_progress_at": None,
        "expires_at": created + window_seconds(window),
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "usage": usage(0, 0),
        "metadata": metadata,
    }


def usage(input_tokens: int, output_tokens: int) -> dict:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def moved(batch: dict, status: str, **fields) -> dict:
    """The batch in a new state, with that state's timestamp (`in_progress_at`, `completed_at`, ...)."""
    return {**batch, **fields, "status": status, f"{status}_at": now()}


def list_page(data: list[dict], limit: int) -> dict:
    """OpenAI's list object; `data` holds one more than `limit` when there is a next page."""
    page = data[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(data) > limit,
    }
