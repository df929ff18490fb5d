"""What the in-process engine needs to survive its engine processes: their output kept to tell why
one died, the batch limits an out-of-memory taught (persisted beside the results), a watchdog for a
step that never returns or an engine core that vanished, and a reaper that kills them when this
process dies without its clean-up (SIGKILL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tasks import console, keys, storage
from tasks.config import ModelConfig

# What an allocation failure says in the engine's output, on the GPU build and the CPU build
# ("DefaultCPUAllocator: can't allocate memory ... (Cannot allocate memory)", "CUDA out of memory").
# oneDNN (CPU build) reports a failed allocation while it creates a kernel only as "could not create
# a primitive": seen mid-run under an address-space limit; a kernel vLLM cannot build at all already
# fails the engine's warm-up, before any request.
MEMORY_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "memoryerror",
    "std::bad_alloc",
    "could not create a primitive",
)


class EngineHung(RuntimeError):
    """The watchdog's verdict on a step that did not return in time (its engine processes are killed)."""


# ---------------------------------------------------------------- the engine processes' output


class EngineOutput:
    """The output of the engine's processes, passed on to this process's own, its last lines kept.

    vLLM sends the client only "engine dead", never why: the reason is in the traceback its engine
    core logs before it exits. The engine's processes inherit this process's stdout and stderr when
    they start, so for that moment both point at pipes that a thread copies through.
    """

    def __init__(self):
        self.lines: deque[str] = deque(maxlen=400)
        self.last_read = 0.0

    @contextmanager
    def capture(self) -> Iterator[None]:
        self.lines.clear()
        sys.stdout.flush()
        sys.stderr.flush()
        originals = {fd: os.dup(fd) for fd in (1, 2)}
        try:
            for fd, original in originals.items():
                read_end, write_end = os.pipe()
                os.dup2(write_end, fd)
                os.close(write_end)
                # the terminal, or the log file of a quiet console (the engine's lines stay in `lines` either way)
                destination = os.open(console.log_path(), os.O_WRONLY | os.O_APPEND) if console.log_path() else os.dup(original)
                threading.Thread(target=self.copy, args=(read_end, destination), daemon=True).start()
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in originals.items():
                os.dup2(original, fd)
                os.close(original)

    def copy(self, read_end: int, destination: int) -> None:
        partial = b""
        with open(read_end, "rb", buffering=0) as pipe, open(destination, "wb", buffering=0) as out:
            while chunk := pipe.read(65536):
                with suppress(OSError):  # nobody reads our output any more: keep draining the engine's
                    out.write(chunk)
                *complete, partial = (partial + chunk).split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in complete)
                self.last_read = time.monotonic()

    def mentions_out_of_memory(self) -> bool:
        """Whether the engine's last words were an allocation failure (read once its output went quiet)."""
        deadline = time.monotonic() + 5
        while time.monotonic() - self.last_read < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        return any(marker in line.lower() for line in self.lines for marker in MEMORY_MARKERS)

    def last_error(self) -> str:
        errors = [line for line in self.lines if "Error" in line or "error" in line]
        return errors[-1].strip() if errors else "no error in the engine's output"


# ---------------------------------------------------------------- batch limits after an out-of-memory

LIMIT_NAMES = ("max_num_seqs", "max_num_batched_tokens")


def limits_file(storage_folder: str) -> str:
    return storage.join(storage_folder, "engine-limits.json")


def saved_limits(path: str | None, config: ModelConfig) -> dict[str, int]:
    """The lowered max_num_seqs / max_num_batched_tokens an earlier out-of-memory left for these engine args."""
    if path is None or not storage.exists(path):
        return {}
    entry = json.loads(storage.read_text(path)).get(keys.content_hash(config.vllm_args()), {})
    return {name: entry[name] for name in LIMIT_NAMES if name in entry}


def save_limits(path: str | None, config: ModelConfig, limits: dict[str, int], reason: str) -> None:
    """Record the lowered limits so the next process (a retried worker group) starts from them; lowest wins."""
    if path is None:
        return
    saved = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    key = keys.content_hash(config.vllm_args())
    before = saved.get(key, {})
    lowest = {name: min(value, before.get(name, value)) for name, value in limits.items()}
    saved[key] = {**lowest, "engine_args": config.vllm_args(), "reason": reason}
    storage.write_text(json.dumps(saved, indent=2, sort_keys=True, default=str), path)


def lowered(limits: dict[str, int], token_floor: int) -> dict[str, int]:
    """Half the sequences and half the batched tokens, down to one sequence and `token_floor` tokens."""
    tokens = limits["max_num_batched_tokens"]
    return {
        "max_num_seqs": max(1, limits["max_num_seqs"] // 2),
        "max_num_batched_tokens": max(min(token_floor, tokens), tokens // 2),
    }


# ---------------------------------------------------------------- the engine's processes


def engine_processes(llm) -> list:
    """The live processes of this vLLM engine: its engine core(s) and their workers."""
    import psutil

    manager = getattr(llm.llm_engine.engine_core.resources, "engine_manager", None)
    found = []
    for process in getattr(manager, "processes", []):
        with suppress(psutil.Error, ValueError):
            core = psutil.Process(process.pid)
            found += [core, *core.children(recursive=True)]
    return found


def kill_processes(processes: list) -> None:
    import psutil

    for process in processes:
        with suppress(psutil.Error):
            if process.is_running():  # compares the start time too: never a reused pid
                process.kill()
    psutil.wait_procs(processes, timeout=10)


class Watchdog:
    """Turns a step that does not return into an engine death the loop recovers from.

    Two ways a step waits forever: the engine core was killed (vLLM notices and marks its client
    dead, but a step already waiting for output is never woken), or it hangs (no step returns
    within `timeout` seconds while requests are in flight: its processes are killed). Either way
    the waiting step is handed the error, as vLLM hands it a death it was told of.
    """

    def __init__(self, loop, timeout: float):
        self.loop, self.timeout = loop, timeout
        self.interrupted = None  # the engine already handed its death
        self.hung = None  # the engine the watchdog found hung
        self.stopping = threading.Event()
        threading.Thread(target=self.watch, name="vllm-engine-watchdog", daemon=True).start()

    def watch(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        while not self.stopping.wait(0.5):
            llm, started = self.loop.llm, self.loop.step_started
            if started is None or llm is self.interrupted:
                continue
            if llm.llm_engine.engine_core.resources.engine_dead:
                self.interrupt(llm, EngineDeadError())
            elif time.monotonic() - started > self.timeout:
                self.hung = llm  # before the kill: the step may wake with vLLM's own "engine dead" first
                kill_processes(engine_processes(llm))
                self.interrupt(llm, EngineHung(f"no engine step returned within step_timeout_seconds={self.timeout:g}"))

    def interrupt(self, llm, error: BaseException) -> None:
        self.interrupted = llm
        llm.llm_engine.engine_core.outputs_queue.put_nowait(error)

    def stop(self) -> None:
        self.stopping.set()


# ---------------------------------------------------------------- the reaper

_reaper: subprocess.Popen | None = None


def ensure_reaper() -> None:
    """Start this process's reaper (once): it kills the engine processes and Prefect's temporary server
    when this process ends."""
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        script = Path(__file__).with_name("reaper.py")
        # -I: only the standard library and psutil, whatever the caller's path; the pipe's write end stays ours alone
        _reaper = subprocess.Popen([sys.executable, "-I", str(script)], stdin=subprocess.PIPE)
