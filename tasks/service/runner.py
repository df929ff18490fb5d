"""The Batch API's runner: each batch becomes a run of the batch-inference flow, in a process of its own.

One process beside the API (RunnerProcess) moves every batch through OpenAI's states: validating → in_progress → finalizing →
completed (or failed, expired, cancelling → cancelled). A batch's run is a process of the server's
own or a flow run of a deployment (launchers.py): either way it outlives the server, so the server
can be stopped, killed or restarted while it runs: the restarted server finds the run still going
and watches it again, or starts it again, and the run goes on from what was committed (nothing is
answered twice). Polls never wait for a run: counts are copied
into the batch object here, from the results file, between the run's commits.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

from tasks import storage
from tasks.config import ServiceConfig, openai_batch_dataset
from tasks.export.batch_files import write_batch_result
from tasks.service.launchers import DeploymentRuns, LocalRuns
from tasks.service.objects import file_object, moved, now, usage
from tasks.service.uploads import batch_lines, check_batch_file
from tasks.store.commit import mark_run
from tasks.store.connection import writing
from tasks.store.queries import newest_run_progress
from tasks.store.service import add_file, batches_in, service_db, update_batch

log = logging.getLogger("vbf.serve")
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies

ACTIVE = ("validating", "in_progress", "cancelling", "finalizing")
# The code and message of the lines a run did not answer, by how the batch ended.
UNANSWERED = {
    "expired": ("batch_expired", "the batch's completion window ended before this request was answered"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request was answered"),
    "failed": ("batch_failed", "the batch's run failed before this request was answered"),
    "completed": ("batch_not_answered", "the run ended without an answer to this request"),
}


class RunnerProcess:
    """The runner in a process of its own beside the API: its work (counts read from DuckDB, output
    files written from 20k rows) never holds the API's GIL, so a poll answers in milliseconds. It
    dies with the server, even a SIGKILLed one, so a restarted server never has two runners."""

    def __init__(self, config: ServiceConfig, db_path: str):
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(target=run_batches, args=(config, db_path, os.getpid()), name="vbf-batch-runner")

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        """The server stops; the runs go on (a restarted server watches them again)."""
        self.process.terminate()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def run_batches(config: ServiceConfig, db_path: str, server_pid: int) -> None:
    """The runner process: until SIGTERM, or the server's death (the kernel's PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:  # the server died before the line above
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runner = BatchRunner(config, db_path)
    signal.signal(signal.SIGTERM, lambda *_: runner.stopping.set())
    runner.loop()


class BatchRunner:
    def __init__(self, config: ServiceConfig, db_path: str):
        self.config, self.models, self.db_path = config, config.models, db_path
        if config.deployment:
            self.runs = DeploymentRuns(config.store, config.deployment, config.metrics)
        else:
            self.runs = LocalRuns(config.store, config.metrics)
        self.counted_at: dict[str, float] = {}  # when each running batch's counts were last read
        self.stopping = threading.Event()

    def loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - one bad pass is logged; the next pass tries again
                log.exception("batch runner pass failed")
            self.stopping.wait(self.config.poll_seconds)

    def step(self) -> None:
        """One pass over the active batches, in queue order (priority, then age)."""
        with service_db(self.db_path, write=False) as con:  # a read: the write lock is taken only to change a batch
            queue = batches_in(con, ACTIVE)
        running = sum(1 for batch, run in queue if batch["status"] == "in_progress" and self.alive(batch["id"], run))
        for batch, run in queue:
            if batch["status"] == "validating":
                self.validate(batch, run)
            elif batch["status"] == "in_progress":
                free_slot = self.runs.queues_itself or running < self.config.running_batches
                running += self.advance(batch, run, free_slot)
            elif batch["status"] == "cancelling":
                self.stop_run(batch["id"], run)
                self.finalize(batch, run, "cancelled")
            else:
                self.finalize(batch, run, run["ending"])

    # ------------------------------------------------------------ states

    def validate(self, batch: dict, run: dict) -> None:
        model, errors, unknown = check_batch_file(run["upload"], batch["endpoint"], self.models)
        if model is None and not errors:
            known = ", ".join(self.models)
            errors = [
                {
                    "code": "model_not_found",
                    "message": f"no line names a model this server serves ({known})",
                    "param": "body.model",
                    "line": None,
                }
            ]
        if errors:
            self.save(moved(batch, "failed", errors={"object": "list", "data": errors}))
            return
        run = {**run, "model": model, "input": self.write_run_input(batch["id"], run, model, unknown)}
        self.save(moved(batch, "in_progress", model=model), run)

    def advance(self, batch: dict, run: dict, free_slot: bool) -> int:
        """A batch in progress: expired, watched, finished, or started. Returns 1 if it started now."""
        if now() >= batch["expires_at"]:
            self.stop_run(batch["id"], run)
            self.finalize(batch, run, "expired")
            return 0
        if self.alive(batch["id"], run):
            self.refresh_counts(batch)
            return 0
        progress = newest_run_progress(self.config.store.duckdb_path, batch["id"], self.config.store.lock_timeout_seconds)
        if progress and progress["status"] == "completed" and run["attempts"] > 0:
            self.finalize(batch, run, "completed")
        elif run["attempts"] >= self.config.run_attempts:
            self.finalize(batch, run, "failed")
        elif free_slot:
            self.launch(batch, run)
            return 1
        return 0

    def finalize(self, batch: dict, run: dict, ending: str) -> None:
        """Write the output and error files from what the run committed, then end the batch. Only a completed
        batch passes through `finalizing`, as OpenAI's do: a cancelled one goes from `cancelling` to
        `cancelled`, and the other endings are idempotent steps a restarted runner takes again."""
        if ending == "completed" and batch["status"] != "finalizing":
            run = {**run, "ending": ending}
            batch = moved(batch, "finalizing")
            self.save(batch, run)
        if ending != "completed":
            self.end_run_left_running(batch["id"], "failed" if ending == "failed" else "cancelled")
        folder = Path(run["folder"])
        output_path, error_path = str(folder / "output.jsonl"), str(folder / "errors.jsonl")
        files = self.write_result_files(batch, run, ending, output_path, error_path)
        output_id, error_id = f"file-{batch['id']}-output", f"file-{batch['id']}-errors"
        with service_db(self.db_path) as con:
            if files.output_lines:
                add_file(
                    con, run["owner"], self.produced(output_id, output_path, "batch_output"), output_path, files.output_lines
                )
            if files.error_lines:
                add_file(con, run["owner"], self.produced(error_id, error_path, "batch_output"), error_path, files.error_lines)
        counts = {"total": files.output_lines + files.error_lines, "completed": files.output_lines, "failed": files.error_lines}
        ended = moved(
            batch,
            ending,
            output_file_id=output_id if files.output_lines else None,
            error_file_id=error_id if files.error_lines else None,
            request_counts=counts,
            usage=usage(files.prompt_tokens, files.completion_tokens),
        )
        if ending == "failed":
            message = (
                f"the batch's run ended early {run['attempts']} times in a row (last: {self.runs.where(run)}; log in {folder})"
            )
            ended["errors"] = {
                "object": "list",
                "data": [{"code": "run_failed", "message": message, "param": None, "line": None}],
            }
        self.save(ended)
        log.info("batch %s %s: %d answered, %d errors", batch["id"], ending, files.output_lines, files.error_lines)

    def end_run_left_running(self, batch_id: str, status: str) -> None:
        """A stopped run killed before it could say so (a worker kills a cancelled flow run 30 s after its
        SIGTERM, e.g. while its engine still loads) keeps its committed outputs and gets its true status."""
        progress = newest_run_progress(self.config.store.duckdb_path, batch_id, self.config.store.lock_timeout_seconds)
        if progress is not None and progress["status"] == "running":
            with writing(self.config.store.duckdb_path, self.config.store.lock_timeout_seconds) as con:
                mark_run(con, progress["run_id"], status)

    # ------------------------------------------------------------ the run

    def launch(self, batch: dict, run: dict) -> None:
        dataset = openai_batch_dataset(run["input"], name=batch["id"])
        priority = (batch["metadata"] or {}).get("priority", "normal")
        started = self.runs.start(batch["id"], Path(run["folder"]), dataset, self.models[run["model"]], priority)
        run = {**run, **started, "attempts": run["attempts"] + 1}
        self.save(batch, run)
        log.info("batch %s: run %d started (%s, model %s)", batch["id"], run["attempts"], self.runs.where(run), run["model"])

    def alive(self, batch_id: str, run: dict) -> bool:
        """Whether the batch's run is still going: one this server started, or one a server before it started."""
        return self.runs.alive(batch_id, run)

    def stop_run(self, batch_id: str, run: dict) -> None:
        self.runs.stop(batch_id, run)

    # ------------------------------------------------------------ files and counts

    def write_run_input(self, batch_id: str, run: dict, model: str, unknown: int) -> str:
        """The lines the run answers: the upload itself, or without the lines naming an unknown model."""
        if not unknown:
            return run["upload"]
        path = str(Path(run["folder"]) / "input.jsonl")
        with storage.atomic_writer(path, "wb") as handle:
            for raw, _, _, line_model in batch_lines(run["upload"]):
                if line_model == model:
                    handle.write(raw)
        return path

    def write_result_files(self, batch: dict, run: dict, ending: str, output_path: str, error_path: str):
        """One line per input line: answers, errors, lines never answered, lines naming an unknown model."""
        unknown_models = [
            (custom_id, "model_not_found", f"model {line_model!r} is not served here (served: {', '.join(self.models)})")
            for _, custom_id, _, line_model in batch_lines(run["upload"])
            if line_model != run.get("model")
        ]
        progress = newest_run_progress(self.config.store.duckdb_path, batch["id"], self.config.store.lock_timeout_seconds)
        code, message = UNANSWERED[ending]
        if progress is None:  # never started: every line is unanswered
            unanswered = [
                (custom_id, code, message) for _, custom_id, _, m in batch_lines(run["upload"]) if m == run.get("model")
            ]
            return write_batch_result(None, None, output_path, error_path, extra_errors=unanswered + unknown_models)
        return write_batch_result(
            self.config.store,
            progress["run_id"],
            output_path,
            error_path,
            (code, message),
            unknown_models,
            model_name=run.get("model"),
        )

    def refresh_counts(self, batch: dict) -> None:
        """The counts of a running batch, every `counts_seconds`: each read holds off the run's commits a moment."""
        if time.monotonic() - self.counted_at.get(batch["id"], 0.0) < self.config.counts_seconds:
            return
        self.counted_at[batch["id"]] = time.monotonic()
        progress = newest_run_progress(self.config.store.duckdb_path, batch["id"], self.config.store.lock_timeout_seconds)
        if progress is None:
            return
        counts = {**batch["request_counts"], "completed": progress["completed"], "failed": progress["failed"]}
        if counts != batch["request_counts"]:
            self.save(
                {**batch, "request_counts": counts, "usage": usage(progress["prompt_tokens"], progress["completion_tokens"])}
            )

    def produced(self, file_id: str, path: str, purpose: str) -> dict:
        return {**file_object(file_id, Path(path).name, os.path.getsize(path), purpose), "filename": f"{file_id}.jsonl"}

    def save(self, batch: dict, run: dict | None = None) -> None:
        with service_db(self.db_path) as con:
            update_batch(con, batch["id"], batch, run)


def new_batch_run(folder: str, owner: str, upload: str, batch_id: str) -> dict:
    """The server's record of a batch's run, before it starts."""
    run_folder = Path(folder) / "batches" / batch_id
    run_folder.mkdir(parents=True, exist_ok=True)
    return {"owner": owner, "upload": upload, "folder": str(run_folder), "attempts": 0, "pid": None, "model": None}
