"""`vbf serve`: the part of the OpenAI API that batch users touch — /v1/files and /v1/batches — in
OpenAI's own shapes, so the official `openai` SDK works against it unchanged.

Requests only read and write the service's records (SQLite) and its files; the runner (runner.py)
does the work. With API keys (`vbf keys create`), each request needs one, and each key sees only its
own files and batches: another key's object is a 404, as if it did not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel

from tasks import storage
from tasks.config import ServiceConfig
from tasks.service import page
from tasks.service.launchers import live_progress
from tasks.service.objects import PRIORITIES, ApiError, batch_object, file_object, list_page, new_id, now
from tasks.service.runner import RunnerProcess, new_batch_run
from tasks.service.uploads import UploadCheck, copy_checked
from tasks.store import service as records

NO_KEYS_OWNER = "local"
AUDIT_SECONDS = 0.5  # a killed server loses at most this much of its audit trail  # the one owner of a server without keys (which binds only to loopback)
PAGE_COOKIE = "vbf_key"  # the dashboard's key, set by its form
PAGE_BATCHES = 500  # the newest batches the dashboard shows


def key_hash(key: str) -> str:
    """Keys are 256-bit random tokens: a plain SHA-256 of one cannot be reversed or guessed."""
    return hashlib.sha256(key.encode()).hexdigest()


def service_db_path(folder: str) -> str:
    return str(Path(folder) / "service.sqlite")


class AuditTrail:
    """Who did what, written every AUDIT_SECONDS in one transaction: a status poll then only reads the
    records (a reader never waits in WAL mode) instead of taking the write lock for its audit row."""

    def __init__(self, db_path: str):
        self.db_path, self.pending, self.lock = db_path, [], threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="audit-trail", daemon=True)

    def add(self, owner: str, action: str, object_id: str) -> None:
        with self.lock:
            self.pending.append((owner, action, object_id, time.time()))

    def flush(self) -> None:
        with self.lock:
            rows, self.pending = self.pending, []
        if rows:
            with records.service_db(self.db_path) as con:
                for owner, action, object_id, at in rows:
                    records.record_audit(con, owner, action, object_id, at)

    def loop(self) -> None:
        while not self.stopping.wait(AUDIT_SECONDS):
            self.flush()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.flush()


class BatchRequest(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def create_app(config: ServiceConfig) -> FastAPI:
    db_path, models = service_db_path(config.folder), config.models
    runner = RunnerProcess(config, db_path)

    audit = AuditTrail(db_path)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        runner.start()
        audit.start()
        yield
        runner.stop()
        audit.stop()

    app = FastAPI(title="vllm-batch-flows Batch API", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.middleware("http")
    async def refuse_large_uploads(request: Request, call_next):
        """Before the body is read: an upload whose declared size is over the limit is a 413 at once."""
        declared = request.headers.get("content-length")
        if request.url.path == "/v1/files" and declared and int(declared) > config.max_file_bytes + 64 * 1024:
            error = ApiError(413, f"file is larger than the limit of {config.max_file_bytes} bytes", "file", "file_too_large")
            return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    def caller(request: Request, action: str, object_id: str = "") -> str:
        """The key's id (the owner of what it creates), with the action recorded; 401 without a valid key."""
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        return owner_of(token, action, object_id)

    def owner_of(token: str, action: str, object_id: str = "") -> str:
        with records.service_db(db_path, write=False) as con:
            if not records.any_active_key(con):
                owner = NO_KEYS_OWNER
            else:
                owner = records.key_of_hash(con, key_hash(token)) if token else None
                if owner is None:
                    raise ApiError(
                        401,
                        "no API key, or an unknown or revoked one: pass a key from `vbf keys create` as Bearer",
                        code="invalid_api_key",
                    )
        audit.add(owner, action, object_id)
        return owner

    # ------------------------------------------------------------ files

    @app.post("/v1/files")
    def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
        owner = caller(request, "file.create")
        if purpose != "batch":
            raise ApiError(400, f"purpose {purpose!r}: this server takes batch files only (purpose=batch)", "purpose")
        file_id = new_id("file-")
        path = str(Path(config.folder) / "files" / f"{file_id}.jsonl")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        check = UploadCheck(config.max_line_bytes, config.max_lines)
        with storage.atomic_writer(path, "wb") as target:  # a refused upload leaves no file
            size = copy_checked(file.file, target, check, config.max_file_bytes)
        created = file_object(file_id, file.filename or "upload.jsonl", size, purpose)
        with records.service_db(db_path) as con:
            records.add_file(con, owner, created, path, check.lines)
            records.record_audit(con, owner, "file.created", file_id)
        return created

    @app.get("/v1/files")
    def list_files(request: Request, purpose: str | None = None, limit: int = 10000) -> dict:
        owner = caller(request, "file.list")
        with records.service_db(db_path, write=False) as con:
            return list_page(records.list_files(con, owner, purpose, limit + 1), limit)

    def owned_file(request: Request, file_id: str, action: str) -> tuple[str, dict, str, int]:
        """(owner, file object, path, lines) of the caller's file; 404 for anyone else's."""
        owner = caller(request, action, file_id)
        with records.service_db(db_path, write=False) as con:
            record = records.file_record(con, owner, file_id)
        if record is None:
            raise ApiError(404, f"No such File object: {file_id}", "id")
        return (owner, *record)

    @app.get("/v1/files/{file_id}")
    def get_file(request: Request, file_id: str) -> dict:
        return owned_file(request, file_id, "file.read")[1]

    @app.get("/v1/files/{file_id}/content")
    def file_content(request: Request, file_id: str) -> FileResponse:
        _, _, path, _ = owned_file(request, file_id, "file.download")
        return FileResponse(path, media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(request: Request, file_id: str) -> dict:
        owner, _, path, _ = owned_file(request, file_id, "file.delete")
        with records.service_db(db_path) as con:
            records.remove_file(con, owner, file_id)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------ batches

    @app.post("/v1/batches")
    def create_batch(request: Request, body: BatchRequest) -> dict:
        owner, _, upload, lines = owned_file(request, body.input_file_id, "batch.create")
        batch = batch_object(body.input_file_id, body.endpoint, body.completion_window, body.metadata, lines)
        priority = PRIORITIES[(body.metadata or {}).get("priority", "normal")]
        with records.service_db(db_path) as con:
            records.add_batch(con, owner, batch, priority, new_batch_run(config.folder, owner, upload, batch["id"]))
            records.record_audit(con, owner, "batch.created", batch["id"])
        return batch

    @app.get("/v1/batches/{batch_id}")
    def get_batch(request: Request, batch_id: str) -> dict:
        owner = caller(request, "batch.read", batch_id)
        with records.service_db(db_path, write=False) as con:
            record = records.batch_record(con, batch_id, owner)
        if record is None:
            raise ApiError(404, f"No such Batch object: {batch_id}", "id")
        return record[0]

    @app.get("/v1/batches")
    def list_batches(request: Request, after: str | None = None, limit: int = 20) -> dict:
        owner = caller(request, "batch.list")
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit must be between 1 and 100", "limit")
        with records.service_db(db_path, write=False) as con:
            return list_page(records.list_batches(con, owner, after, limit + 1), limit)

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(request: Request, batch_id: str) -> dict:
        owner = caller(request, "batch.cancel", batch_id)
        with records.service_db(db_path) as con:
            batch = records.request_cancel(con, batch_id, owner, now())
        if batch is None:
            raise ApiError(404, f"No such Batch object: {batch_id}", "id")
        if batch["status"] not in ("cancelling", "cancelled"):
            raise ApiError(409, f"batch {batch_id} is {batch['status']}: it can no longer be cancelled", "id")
        return batch

    # ------------------------------------------------------------ the dashboard page

    @app.get("/", response_class=HTMLResponse)
    def dashboard(request: Request, key: str | None = None) -> HTMLResponse:
        """The caller's batches and the served models; the key comes as `?key=` or the cookie the form sets."""
        try:
            owner = owner_of(key or request.cookies.get(PAGE_COOKIE, ""), "page.read")
        except ApiError as refused:
            message = "this server needs an API key" if not (key or request.cookies.get(PAGE_COOKIE)) else refused.message
            return HTMLResponse(page.key_form(message), status_code=401)
        with records.service_db(db_path, write=False) as con:
            batches = records.list_batches(con, owner, None, PAGE_BATCHES)
            in_progress = records.batches_in(con, ("in_progress",))
        running = records.models_running(in_progress)
        shown = {batch["id"] for batch in batches}
        live = {batch["id"]: live_progress(run) for batch, run in in_progress if batch["id"] in shown}
        served = {name: name in running for name in models}
        return HTMLResponse(page.dashboard(batches, served, owner, time.time(), live))

    @app.post("/")
    def remember_key(key: str = Form(...)) -> RedirectResponse:
        """The form's key, kept in a cookie only this server reads (not in the address, nor in history)."""
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(PAGE_COOKIE, key, httponly=True, samesite="strict")
        return response

    @app.get("/v1/models")
    def list_models(request: Request) -> dict:
        caller(request, "model.list")
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vbf"} for name in models]}

    return app
