"""Faults, measured: SIGKILL of the flow process at 10 points of one job, and SIGKILL of vLLM's engine core.

1. One job of N unique chat requests is run again and again, each run SIGKILLed at the next point
   (mid-prepare; engine loaded but nothing finished; at 10/20/30/55/70% of the requests finished;
   inside two shard commits; with every request finished, before the run's end), then run to the end.
   Only the flow's own process is killed, as the out-of-memory killer would: the reaper must end its
   engine and Prefect's temporary server. Per kill it prints what the engine held (sent, not finished),
   what had finished but was not saved (so is computed again: target at most the engine's batch),
   and what outlived the process. At the end: outputs lost (0) and duplicated (0), and the total
   computed again (sum over the runs of what the engine finished, minus the unique requests).
2. The same job unfaulted, and with the engine core SIGKILLed halfway: wall time of the faulted run
   against the unfaulted one (target: at most one engine start + 10%).

Progress is read from inside the flow process: a thread of the run script writes the engine loop's
counters (requests handed to vLLM, requests finished) to a file every 20 ms.

    PYTHONPATH=. .venv/bin/python bench/kill_matrix.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import duckdb
import psutil
import pyarrow.parquet as pq

from bench.bench_inference import write_inputs
from bench.common import ENGINE_ARGS, MODEL, build_tiny_model, create_prefect_database, prefect_env

MAX_TOKENS = 8

RUN = textwrap.dedent(
    """
    import json, os, sys, threading, time

    def watch(path):
        import tasks.engines.vllm as engines
        while True:
            engine = engines._engine
            if engine is not None:
                loop = engine.loop
                state = {"sent": loop.sent, "settled": loop.settled, "admit_below": loop.admit_below,
                         "max_num_seqs": engine.max_num_seqs, "engine_core": engine.processes[0].pid if engine.processes else None}
                with open(path + ".tmp", "w") as f:
                    json.dump(state, f)
                os.replace(path + ".tmp", path)
            time.sleep(0.02)

    if __name__ == "__main__":
        progress, spec, duckdb_path, storage_dir, model, engine_args, max_tokens, summary = sys.argv[1:9]
        from flows.batch_inference import batch_inference
        from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, StoreConfig
        threading.Thread(target=watch, args=(progress,), daemon=True).start()
        result = batch_inference(
            dataset=DatasetSpec.from_yaml(spec),
            model=ModelConfig(model=model, **json.loads(engine_args)),
            sampling=SamplingConfig(max_tokens=int(max_tokens)),
            store=StoreConfig(duckdb_path=duckdb_path, storage=storage_dir),
        )
        with open(summary, "w") as f:
            f.write(result.model_dump_json())
    """
)


class Job:
    """One job's folder: its storage and results file, shared by every run of it."""

    def __init__(self, folder: Path, spec: Path, env: dict):
        self.folder, self.spec, self.env = folder, spec, env
        self.storage, self.duckdb = folder / "storage", folder / "results.duckdb"
        self.progress = folder / "progress.json"
        self.script = folder / "run.py"
        folder.mkdir()
        self.script.write_text(RUN)
        self.runs = 0

    def start(self) -> tuple[subprocess.Popen, Path]:
        self.runs += 1
        self.progress.unlink(missing_ok=True)
        summary = self.folder / f"summary-{self.runs}.json"
        engine_args = {
            "max_model_len": ENGINE_ARGS["max_model_len"],
            "gpu_memory_utilization": ENGINE_ARGS["gpu_memory_utilization"],
        }
        arguments = [self.progress, self.spec, self.duckdb, self.storage, MODEL, json.dumps(engine_args), MAX_TOKENS, summary]
        with open(self.folder / f"run-{self.runs}.log", "w") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                [sys.executable, str(self.script), *map(str, arguments)],
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        return process, summary

    def loop_counters(self) -> dict:
        try:
            return json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return {}

    def saved(self) -> int:
        """Requests whose answers a re-run finds: in shard output files or in shard journals."""
        files = [*(self.storage / "outputs").glob("*.parquet"), *(self.storage / "journal").glob("*/*.parquet")]
        keys = set()
        for path in files:
            keys.update(pq.read_table(path, columns=["request_key"])["request_key"].to_pylist())
        return len(keys)

    def preparing(self) -> bool:
        prepared = list((self.storage / "prepared").glob("*"))
        return bool(prepared) and not any((folder / "request-set.json").exists() for folder in prepared)

    def committing(self) -> bool:
        """A transaction of the results file is open: DuckDB keeps a write-ahead log only then."""
        return Path(f"{self.duckdb}.wal").exists()


def kill_points(unique: int) -> list[tuple[str, object]]:
    """(name, condition over (job, loop counters, saved before this run))."""

    def finished_share(share: float):
        return lambda job, loop, before: before + loop.get("settled", 0) >= share * unique

    def commit_after(share: float):
        return lambda job, loop, before: finished_share(share)(job, loop, before) and job.committing()

    return [
        ("mid-prepare", lambda job, loop, before: job.preparing()),
        ("engine loaded, nothing finished", lambda job, loop, before: loop.get("sent", 0) > 0 and loop.get("settled") == 0),
        ("10% finished", finished_share(0.10)),
        ("20% finished", finished_share(0.20)),
        ("30% finished", finished_share(0.30)),
        ("inside a shard commit (after 40%)", commit_after(0.40)),
        ("55% finished", finished_share(0.55)),
        ("70% finished", finished_share(0.70)),
        ("inside a shard commit (after 80%)", commit_after(0.80)),
        ("every request finished", lambda job, loop, before: loop.get("settled", 0) > 0 and before + loop["settled"] >= unique),
    ]


def descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_run_at(job: Job, name: str, condition, before: int) -> dict:
    process, _ = job.start()
    children: dict[int, psutil.Process] = {}
    while True:
        if process.poll() is not None:
            raise SystemExit(f"run {job.runs} ended before the kill point '{name}': see {job.folder}/run-{job.runs}.log")
        children.update((child.pid, child) for child in descendants(process))
        loop = job.loop_counters()
        if condition(job, loop, before):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(10)  # the reaper's time
    survivors = [child for child in children.values() if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    names = sorted({" ".join(child.cmdline()[:3])[:60] for child in survivors})
    for child in survivors:
        child.kill()
    saved = job.saved()
    settled, sent = loop.get("settled", 0), loop.get("sent", 0)
    return {
        "point": name,
        "in_engine": sent - settled,
        "finished": settled,
        "newly_saved": saved - before,
        "not_saved": settled - (saved - before),
        "admit_below": loop.get("admit_below"),
        "saved": saved,
        "survivors": names,
    }


def run_to_end(job: Job, kill_engine_core_at: float | None = None, total: int = 0) -> tuple[float, dict]:
    started = time.perf_counter()
    process, summary = job.start()
    killed = kill_engine_core_at is None
    while process.poll() is None:
        loop = job.loop_counters()
        if not killed and loop.get("settled", 0) >= kill_engine_core_at * total and loop.get("engine_core"):
            os.kill(loop["engine_core"], signal.SIGKILL)
            killed = True
        time.sleep(0.01)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"run {job.runs} failed: see {job.folder}/run-{job.runs}.log")
    return wall, json.loads(summary.read_text())


def kill_matrix(folder: Path, spec: Path, unique: int, env: dict) -> None:
    job = Job(folder / "killed-job", spec, env)
    rows, before = [], 0
    for name, condition in kill_points(unique):
        row = kill_run_at(job, name, condition, before)
        before = row["saved"]
        rows.append(row)
        print(
            f"  {row['point']:36s} in the engine {row['in_engine']:5d}  finished {row['finished']:6d}  "
            f"saved {row['newly_saved']:6d}  finished but not saved {row['not_saved']:4d} "
            f"(engine batch {row['admit_below']})  outlived the process: {row['survivors'] or 'nothing'}",
            flush=True,
        )
    _, summary = run_to_end(job)
    with duckdb.connect(str(job.duckdb), read_only=True) as con:
        stored, distinct = con.execute("SELECT count(*), count(DISTINCT request_key) FROM outputs").fetchone()
        runs = con.execute("SELECT status, count(*) FROM runs GROUP BY status ORDER BY status").fetchall()
    computed = sum(row["finished"] for row in rows) + summary["engine_requests"]
    print(
        f"  final run: {summary['engine_requests']} requests sent to the engine, {summary['outputs']} outputs, "
        f"{summary['errors']} errors; runs by status {runs}"
    )
    print(
        f"  outputs lost: {unique - distinct}; duplicated: {stored - distinct}; "
        f"computed again over the {len(rows)} kills: {computed - unique} "
        f"(largest after one kill: {max(row['not_saved'] for row in rows)}; "
        f"the engine's batch: {rows[-1]['admit_below']})"
    )


def engine_core_kill(folder: Path, spec: Path, unique: int, env: dict) -> None:
    plain = Job(folder / "unfaulted", spec, env)
    faulted = Job(folder / "engine-core-killed", spec, env)
    plain_wall, plain_summary = run_to_end(plain)
    faulted_wall, faulted_summary = run_to_end(faulted, kill_engine_core_at=0.5, total=unique)
    engine_start = plain_summary["stage_seconds"]["engine_start"]
    print(
        f"  unfaulted {plain_wall:.1f} s; engine core SIGKILLed at 50%: {faulted_wall:.1f} s "
        f"({faulted_summary['outputs']} outputs, {faulted_summary['errors']} errors)"
    )
    print(
        f"  faulted / unfaulted {faulted_wall / plain_wall:.3f}; target <= (unfaulted x 1.1 + one engine start "
        f"{engine_start:.1f} s) = {plain_wall * 1.1 + engine_start:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--skip-engine-core", action="store_true", help="only the 10 kills of the flow process")
    parser.add_argument("--skip-kills", action="store_true", help="only the engine-core SIGKILL against an unfaulted run")
    args = parser.parse_args()
    build_tiny_model()
    with tempfile.TemporaryDirectory(prefix="bench-kill-") as tmp:
        folder = Path(tmp)
        _, spec, _ = write_inputs(folder, args.requests, MAX_TOKENS)
        create_prefect_database(folder)
        env = prefect_env(folder)
        if not args.skip_kills:
            print(
                f"{args.requests} unique chat requests x {MAX_TOKENS} tokens, tiny model on CPU; SIGKILL of the flow process at:"
            )
            kill_matrix(folder, spec, args.requests, env)
        if not args.skip_engine_core:
            print("engine core SIGKILL:")
            engine_core_kill(folder, spec, args.requests, env)


if __name__ == "__main__":
    main()
