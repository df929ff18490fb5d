"""Files and locks under hostile conditions: names that try to leave their folder, a writer killed
mid-write, durability of what later steps trust, and a commit racing an export in another process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.settings import PREFECT_API_URL

from flows.export_curated import export_curated
from flows.export_outputs import export_outputs
from tasks import storage
from tasks.engines.base import OutputRecord, output_table
from tasks.store.commit import CommitFiles, RunRecord, commit_run
from tasks.store.connection import writing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python_env(tmp_path) -> dict:
    return {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-child"),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONPATH": REPO,
    }


# ---------------------------------------------------------------- names


@pytest.mark.slow
def test_a_curated_dataset_name_cannot_leave_its_output_folder(prefect_harness, committed_store, snapshot, tmp_path):
    output_dir = tmp_path / "curated"
    stored = snapshot(committed_store)
    with pytest.raises(ValueError, match=r"'\.\./escaped' would leave the folder .*curated"):
        export_curated(name="../escaped", output_dir=str(output_dir), store=committed_store)
    assert not (tmp_path / "escaped").exists()
    assert snapshot(committed_store) == stored  # no curated version recorded


@pytest.mark.slow
def test_an_export_name_cannot_leave_its_output_folder(prefect_harness, store, rows, commit_inputs, tmp_path):
    hostile = RunRecord(rows.run(run_id="../escaped"), commit_inputs.dataset, commit_inputs.shards, commit_inputs.files)
    with writing(store.duckdb_path) as con:
        commit_run(con, hostile)  # a run id is whatever the caller recorded
    with pytest.raises(ValueError, match=r"'\.\./escaped\.parquet' would leave the folder"):
        export_outputs(str(tmp_path / "out"), run_id="../escaped", store=store)
    assert not list(tmp_path.glob("escaped*"))


# ---------------------------------------------------------------- a writer killed mid-write

KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from tasks import storage
    with storage.atomic_writer(sys.argv[1], "w") as handle:
        handle.write("half of a file")
        handle.flush()
        print("writing", flush=True)
        time.sleep(120)
    """
)


def start_writer(path, tmp_path) -> subprocess.Popen:
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=python_env(tmp_path)
    )
    assert writer.stdout.readline().strip() == "writing"
    return writer


def test_the_leftover_of_a_killed_write_is_removed_and_a_live_writers_file_kept(tmp_path):
    target = tmp_path / "shards" / "s1.parquet"
    killed = start_writer(target, tmp_path)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    leftovers = list(target.parent.glob("s1.parquet.*.partial"))
    assert len(leftovers) == 1  # what a kill -9 leaves
    live = start_writer(target, tmp_path)
    try:
        storage.write_text("complete", str(target))
        remaining = list(target.parent.glob("s1.parquet.*.partial"))
        assert target.read_text() == "complete"
        assert leftovers[0] not in remaining  # the dead writer's leftover is gone
        assert len(remaining) == 1  # the live writer's file is not touched
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- durability

SYNCED_WRITER = "import sys; from tasks import storage; storage.write_text('manifest', sys.argv[1])"


def test_a_published_file_is_on_disk_before_it_gets_its_name(tmp_path):
    """strace shows the system calls: the partial file is fsynced before the rename that publishes it, the folder after."""
    target = tmp_path / "manifest.json"
    trace = tmp_path / "trace.txt"
    subprocess.run(
        ["strace", "-f", "-y", "-o", str(trace), "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-c", SYNCED_WRITER, str(target)],
        check=True, env=python_env(tmp_path),
    )  # fmt: skip
    calls = [line for line in trace.read_text().splitlines() if re.search(r"\b(fsync|fdatasync|rename\w*)\(", line)]
    synced_partial = [i for i, line in enumerate(calls) if "sync(" in line and ".partial>" in line]
    renamed = [i for i, line in enumerate(calls) if "rename" in line and "manifest.json" in line]
    synced_folder = [i for i, line in enumerate(calls) if "sync(" in line and f"<{tmp_path}>" in line]
    assert synced_partial and renamed and synced_partial[0] < renamed[0], calls
    assert synced_folder and synced_folder[-1] > renamed[0], calls
    assert target.read_text() == "manifest"


# ---------------------------------------------------------------- exports in processes of their own

EXPORT_PROCESS = textwrap.dedent(
    """
    import json, sys
    from flows.export_outputs import export_outputs
    from tasks.config import StoreConfig
    if __name__ == "__main__":
        out, store, options = sys.argv[1:]
        export_outputs(out, store=StoreConfig.model_validate_json(store), **json.loads(options))
    """
)


def start_export(tmp_path, out, store, label: str, **options) -> subprocess.Popen:
    """export_outputs(out, **options) in a process and session of its own, reporting to the test
    session's Prefect server (a server of its own takes minutes to start on a busy machine); its
    stderr goes to <label>.log."""
    script = tmp_path / "export.py"
    script.write_text(EXPORT_PROCESS)
    return subprocess.Popen(
        [sys.executable, str(script), str(out), store.model_dump_json(), json.dumps(options)],
        env={**python_env(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()}, stderr=open(tmp_path / f"{label}.log", "w"), start_new_session=True,  # noqa: SIM115
    )  # fmt: skip


def log_of(tmp_path, label: str) -> str:
    return (tmp_path / f"{label}.log").read_text()[-3000:]


def stop_while_writing(export: subprocess.Popen, out, partial: str, tmp_path, label: str) -> None:
    """SIGSTOP the export (and its children) while a partial file matching `partial` is in `out`."""
    deadline = time.monotonic() + 300
    while not list(out.glob(partial)):
        assert export.poll() is None and time.monotonic() < deadline, log_of(tmp_path, label)
        time.sleep(0.002)
    os.killpg(export.pid, signal.SIGSTOP)


def end_process(process: subprocess.Popen) -> None:
    """Whatever a failed test left running: its whole session, stopped or not, is killed."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def many_outputs(tmp_path, rows, run_id: str, count: int) -> RunRecord:
    """A run of `count` answered requests, written as the shard files a commit reads."""
    ids = [f"q{i:06d}" for i in range(count)]
    requests = pa.table(
        {
            "custom_id": ids,
            "request_key": ids,
            "prompt": [f"question {i} " * 20 for i in range(count)],
            "messages": pa.nulls(count, pa.string()),
            "overrides": pa.nulls(count, pa.string()),
            "source_file": ["f"] * count,
            "source_row": list(range(count)),
            "duplicate_of": pa.nulls(count, pa.string()),
            "reference": pa.nulls(count, pa.string()),
        }
    )
    outputs = output_table(
        [OutputRecord(key, text=f"answer {key} " * 20, finish_reason="stop", prompt_tokens=3, completion_tokens=4) for key in ids]
    )
    outputs = outputs.append_column("shard_key", pa.array(["s1"] * count)).append_column("output_key", pa.array(["o1"] * count))
    paths = {name: str(tmp_path / f"{run_id}-{name}.parquet") for name in ("requests", "outputs")}
    storage.write_parquet(requests, paths["requests"])
    storage.write_parquet(outputs, paths["outputs"])
    files = CommitFiles(requests=[paths["requests"]], rejected=[], outputs=[paths["outputs"]], scores=[])
    run = rows.run(run_id=run_id, requests=count, unique_requests=count, duplicates=0, outputs=count, errors=0)
    return RunRecord(run, rows.dataset(requests=count, unique_requests=count), [rows.shard(run_id=run_id)], files)


@pytest.mark.slow
def test_a_commit_lands_while_an_export_writes_its_files(prefect_harness, store, rows, query, tmp_path):
    with writing(store.duckdb_path) as con:
        commit_run(con, many_outputs(tmp_path, rows, "r1", 60_000))
    later_run = many_outputs(tmp_path, rows, "r2", 10)
    out = tmp_path / "out"
    export = start_export(tmp_path, out, store, "export", run_id="r1", formats=["parquet", "chat_jsonl"])
    try:
        stop_while_writing(export, out, "*.partial", tmp_path, "export")  # in the middle of a file
        started = time.monotonic()
        with writing(store.duckdb_path, lock_timeout_seconds=3) as con:
            commit_run(con, later_run)
        assert time.monotonic() - started < 3
        os.killpg(export.pid, signal.SIGCONT)
        assert export.wait(timeout=300) == 0, log_of(tmp_path, "export")
    finally:
        end_process(export)
    assert query(store, "SELECT run_id FROM runs ORDER BY run_id") == [("r1",), ("r2",)]  # the commit landed
    with open(out / "r1.chat.jsonl") as handle:
        assert sum(1 for _ in handle) == 60_000  # the export is whole: it read the file before the commit


# ---------------------------------------------------------------- two exports of one name at once


def waiting_for_a_lock(pid: int) -> bool:
    """The process is blocked asking for a file lock another process holds (Linux: /proc/locks)."""
    with open("/proc/locks") as locks:
        return any(re.search(rf"->\s+\w+\s+\w+\s+\w+\s+{pid}\s", line) for line in locks)


def exported_ids(out, name: str) -> dict[str, list[str]]:
    """The request ids in each of an export's four files (a chat line's answer names its request)."""
    lines = {suffix: (out / f"{name}.{suffix}").read_text().splitlines() for suffix in ("chat.jsonl", "batch_output.jsonl", "batch_errors.jsonl")}  # fmt: skip
    return {
        "parquet": pq.read_table(out / f"{name}.parquet", columns=["custom_id"]).column("custom_id").to_pylist(),
        "chat": [json.loads(line)["messages"][-1]["content"].split()[1] for line in lines["chat.jsonl"]],
        "batch": [json.loads(line)["custom_id"] for line in lines["batch_output.jsonl"] + lines["batch_errors.jsonl"]],
    }


@pytest.mark.slow
def test_two_exports_of_one_name_at_once_leave_the_files_of_one_of_them(prefect_harness, store, rows, tmp_path):
    """The first is stopped after its Parquet file, while it writes the chat file; the second starts
    meanwhile. Unlocked, the second writes all four files and the first, resumed, overwrites three."""
    with writing(store.duckdb_path) as con:
        commit_run(con, many_outputs(tmp_path, rows, "r1", 60_000))
    selections = {
        "first": [f"q{i:06d}" for i in range(10, 60_000)],
        "second": [f"q{i:06d}" for i in range(10)],
    }
    out = tmp_path / "out"
    first = start_export(tmp_path, out, store, "first", run_id="r1", where="source_row >= 10")
    second = None
    try:
        stop_while_writing(first, out, "r1.chat.jsonl.*.partial", tmp_path, "first")
        second = start_export(tmp_path, out, store, "second", run_id="r1", where="source_row < 10")
        deadline = time.monotonic() + 300
        while second.poll() is None and not waiting_for_a_lock(second.pid):  # done, or waits for the first
            assert time.monotonic() < deadline, log_of(tmp_path, "second")
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, log_of(tmp_path, "first")
        assert second.wait(timeout=300) == 0, log_of(tmp_path, "second")
    finally:
        for export in (first, second):
            if export is not None:
                end_process(export)
    exported = exported_ids(out, "r1")
    assert exported["parquet"] in selections.values(), len(exported["parquet"])
    assert exported["chat"] == exported["parquet"], (len(exported["chat"]), len(exported["parquet"]))
    assert exported["batch"] == exported["parquet"], (len(exported["batch"]), len(exported["parquet"]))
    assert not list(out.glob("*.partial"))
