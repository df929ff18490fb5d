"""Real faults of vLLM's engine processes, injected from outside: SIGKILL of the engine core, a real
out-of-memory (an address-space limit set with prlimit) and a hung step (SIGSTOP). Each runs its own
engine in a process of its own, never the session's. (A flow process killed with SIGKILL, whose engine
and Prefect server must end with it: tests/flows/test_resume_and_retries.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow

# Builds the engine, says READY, waits for "go", then answers `requests` prompts in one shard while a
# thread reports how many requests went to the engine; ends with RESULT (or FAILED) as JSON.
FAULT_RUN = """
import json, sys, threading, time
import pyarrow as pa
from tasks.config import ModelConfig, SamplingConfig
from tasks.engines import vllm

if __name__ == "__main__":
    model, storage, requests, words = ModelConfig.model_validate_json(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    engine = vllm.get_engine(model, storage)
    print("READY", json.dumps({"max_num_seqs": engine.max_num_seqs}), flush=True)
    sys.stdin.readline()

    def report():
        while True:
            loop = vllm.get_engine(model, storage).loop
            print("PROGRESS", json.dumps({"sent": loop.sent, "resent": loop.resent, "settled": loop.settled}), flush=True)
            time.sleep(0.1)

    threading.Thread(target=report, daemon=True).start()
    prompts = [f"Request {i}: " + " ".join(f"w{i}x{j}" for j in range(words)) for i in range(requests)]
    shard = pa.table({"request_key": [f"k{i}" for i in range(requests)], "prompt": prompts, "messages": pa.array([None] * requests, pa.string())})
    try:
        result = vllm.SharedVllmEngine(model, storage=storage).generate(shard, SamplingConfig(max_tokens=32), key="faults")
    except Exception as error:
        print("FAILED", json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        sys.exit(1)
    keys = result.outputs["request_key"].to_pylist()
    loop = vllm.get_engine(model, storage).loop
    print("RESULT", json.dumps({"rows": len(keys), "distinct": len(set(keys)), "errors": len(keys) - result.outputs["error_code"].null_count,
        "max_num_seqs": result.max_num_seqs, "sent": loop.sent, "resent": loop.resent}), flush=True)
    vllm.close_engine(timeout=0)
"""


class FaultRun:
    """The script above in a process of its own; its marked lines (READY, PROGRESS, RESULT, FAILED) in a queue."""

    def __init__(self, tmp_path: Path, model, requests: int, words: int = 1, name: str = "run", env: dict | None = None):
        script = tmp_path / "fault_run.py"
        script.write_text(FAULT_RUN)
        self.storage = tmp_path / "storage"
        python_path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        environment = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
        self.log = tmp_path / f"{name}.log"
        self.process = subprocess.Popen(
            [sys.executable, str(script), model.model_dump_json(), str(self.storage), str(requests), str(words)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),  # noqa: SIM115 (the child writes it until it ends)
            text=True,
            env=environment,
        )
        self.lines: queue.Queue[tuple[str, dict]] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self.read, daemon=True).start()

    def read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)  # vLLM logs here
            mark, _, payload = line.partition(" ")
            if mark in {"READY", "PROGRESS", "RESULT", "FAILED"}:
                self.lines.put((mark, json.loads(payload)))
        self.lines.put(("EXIT", {}))

    def expect(self, marks: set[str], timeout: float) -> tuple[str, dict]:
        """The next line with one of these marks (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                mark, payload = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {marks} within {timeout:g} s; log: {self.log}") from None
            if mark in marks:
                return mark, payload
            if mark == "EXIT":
                raise AssertionError(f"the run ended without {marks}; log: {self.log}")

    def go(self) -> dict:
        _, ready = self.expect({"READY"}, timeout=600)
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return ready

    def wait_for_progress(self, settled: int, timeout: float) -> dict:
        """The first report of at least `settled` requests answered since the run began."""
        while True:
            _, progress = self.expect({"PROGRESS"}, timeout)
            if progress["settled"] >= settled:
                return progress

    def engine_core(self) -> psutil.Process:
        return engine_core_of(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def engine_core_of(pid: int, timeout: float = 600, not_pid: int | None = None) -> psutil.Process:
    """The live vLLM engine core under process `pid` (other than `not_pid`), waiting for one to start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "VLLM::EngineCore" in " ".join(child.cmdline()) and child.pid != not_pid and child.status() != "zombie":
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise AssertionError(f"no engine core under {pid} within {timeout:g} s")


def engine_start_of(pid: int, timeout: float, not_pid: int) -> psutil.Process:
    """The next engine process started under `pid`, from its first moment (still named spawn_main)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                command = " ".join(child.cmdline())
                if child.pid != not_pid and ("VLLM::EngineCore" in command or "multiprocessing.spawn" in command):
                    return child
        time.sleep(0.1)
    raise AssertionError(f"no new engine process under {pid} within {timeout:g} s")


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def engine_model(tiny_model_dir, **fields):
    from tasks.config import ModelConfig

    # enforce_eager: no compilation, so the restarts these tests cause take seconds, not a minute
    return ModelConfig(
        model=str(tiny_model_dir),
        mode="completion",
        max_model_len=256,
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        **fields,
    )


def test_sigkill_of_the_engine_core_mid_run_restarts_it_and_resends_only_what_it_held(tiny_model_dir, tmp_path):
    run = FaultRun(tmp_path, engine_model(tiny_model_dir), requests=3000)
    try:
        max_num_seqs = run.go()["max_num_seqs"]
        run.wait_for_progress(settled=200, timeout=300)  # mid-run: answers are coming
        core = run.engine_core()
        core.kill()
        killed_at = time.monotonic()
        engine_start_of(run.process.pid, timeout=30, not_pid=core.pid)
        noticed = time.monotonic() - killed_at
        new_core = engine_core_of(run.process.pid, not_pid=core.pid)
        mark, result = run.expect({"RESULT", "FAILED"}, timeout=600)
    finally:
        run.stop()
    assert mark == "RESULT", result
    assert noticed < 15  # a new engine started seconds after the kill
    assert new_core.pid != core.pid
    assert result["rows"] == result["distinct"] == 3000 and result["errors"] == 0  # each request answered once
    # only what the dead engine held was sent again: at most two batches, never the whole shard
    assert 0 < result["resent"] <= 2 * max_num_seqs
    assert result["sent"] == 3000 + result["resent"]


def test_a_hung_engine_step_is_restarted_by_the_watchdog_and_a_second_hang_fails_naming_the_timeout(tiny_model_dir, tmp_path):
    run = FaultRun(tmp_path, engine_model(tiny_model_dir, step_timeout_seconds=8), requests=4000)
    try:
        run.go()
        run.wait_for_progress(settled=200, timeout=300)
        core = run.engine_core()
        core.suspend()  # SIGSTOP: the step waits for an answer that never comes
        stopped_at = time.monotonic()
        engine_start_of(run.process.pid, timeout=60, not_pid=core.pid)
        restarted_after = time.monotonic() - stopped_at
        new_core = engine_core_of(run.process.pid, not_pid=core.pid)
        assert not alive(core)  # the watchdog killed the hung core
        # the new engine hangs too, as soon as it has the requests the hung one held
        while run.expect({"PROGRESS"}, timeout=600)[1]["resent"] == 0:
            pass
        new_processes = [new_core, *new_core.children(recursive=True)]
        new_core.suspend()
        mark, result = run.expect({"RESULT", "FAILED"}, timeout=120)
        run.process.wait(timeout=60)
        survivors = [p for p in new_processes if alive(p)]
    finally:
        run.stop()
    assert 8 <= restarted_after < 30
    assert mark == "FAILED"
    assert "hung again" in result["error"] and "step_timeout_seconds=8" in result["error"]
    assert not survivors


def test_a_real_out_of_memory_restarts_with_lower_batch_limits_that_a_new_process_starts_from(tiny_model_dir, tmp_path):
    model = engine_model(tiny_model_dir)
    # Long prompts: prefills of thousands of tokens. A fixed mmap threshold keeps glibc from growing it
    # (and then serving big tensors from a heap it keeps): every big tensor is a new mapping, as it is
    # for a GPU allocator's new block, so a step that needs more than is mapped now really asks for it.
    run = FaultRun(tmp_path, model, requests=1500, words=20, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    try:
        max_num_seqs = run.go()["max_num_seqs"]
        run.wait_for_progress(settled=50, timeout=300)
        core = run.engine_core()
        for process in [core, *core.children(recursive=True)]:  # the worker runs the model
            # no address space beyond what it has now: the next step's big allocations really fail
            limit = process.memory_info().vms
            subprocess.run(["prlimit", f"--pid={process.pid}", f"--as={limit}"], check=True)
        mark, result = run.expect({"RESULT", "FAILED"}, timeout=900)
    finally:
        run.stop()
    assert mark == "RESULT", result
    assert result["rows"] == result["distinct"] == 1500 and result["errors"] == 0
    assert result["max_num_seqs"] == max_num_seqs // 2  # what the shard finished with, as run_shards records it
    # a real allocation failed (in PyTorch's allocator, or in oneDNN's as it built a kernel)
    assert any("Cannot allocate memory" in line or "could not create a primitive" in line for line in run.output)
    (saved,) = json.loads((run.storage / "engine-limits.json").read_text()).values()
    assert saved["max_num_seqs"] == max_num_seqs // 2
    assert saved["max_num_batched_tokens"] < 8192 and "out of memory" in saved["reason"]

    # a retried worker group is a new process: it starts from the lowered limits
    after = FaultRun(tmp_path, model, requests=10, name="after")
    try:
        assert after.go()["max_num_seqs"] == max_num_seqs // 2
        mark, result = after.expect({"RESULT", "FAILED"}, timeout=300)
    finally:
        after.stop()
    assert mark == "RESULT" and result["rows"] == 10
