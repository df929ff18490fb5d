import subprocess
import sys
import textwrap
import time

import duckdb
import pyarrow as pa
import pytest

from tasks import files
from tasks.engine import OUTPUT_SCHEMA
from tasks.score import DEFAULT_SCORERS, score_outputs
from tasks.store import LATEST_VERSION, MIGRATIONS, CommitFiles, StoreError, commit_run, connect, migrate

TABLES = ["dataset_versions", "requests", "rejected_rows", "runs", "run_shards", "outputs", "scores"]


def snapshot(con) -> dict:
    return {t: sorted(map(repr, con.execute(f"SELECT * EXCLUDE (created_at) FROM {t}" if t in ("outputs", "scores", "dataset_versions") else f"SELECT * FROM {t}").fetchall())) for t in TABLES}


@pytest.fixture
def commit_inputs(tmp_path):
    requests = pa.table(
        {
            "custom_id": ["a", "b", "c"],
            "request_key": ["k1", "k2", "k1"],
            "prompt": ["p1", "p2", "p1"],
            "messages": [None, None, None],
            "source_file": ["f"] * 3,
            "source_row": [0, 1, 2],
            "duplicate_of": [None, None, "a"],
        }
    )
    outputs = pa.Table.from_pylist(
        [
            {"request_key": "k1", "sample_index": 0, "text": "x", "finish_reason": "length",
             "prompt_tokens": 3, "completion_tokens": 4, "error_code": None, "error": None},
            {"request_key": "k2", "sample_index": 0, "text": None, "finish_reason": None,
             "prompt_tokens": 999, "completion_tokens": None, "error_code": "context_length_exceeded", "error": "long"},
        ],
        schema=OUTPUT_SCHEMA,
    )
    scores = score_outputs(outputs, DEFAULT_SCORERS)
    outputs = outputs.append_column("shard_key", pa.array(["s1", "s1"])).append_column("output_key", pa.array(["o1", "o1"]))
    paths = {name: str(tmp_path / f"{name}.parquet") for name in ("requests", "outputs", "scores")}
    files.write_parquet(requests, paths["requests"])
    files.write_parquet(outputs, paths["outputs"])
    files.write_parquet(scores, paths["scores"])
    run = {
        "run_id": "r1", "dataset_version": "dv1", "dataset_name": "t", "model": "m", "model_fingerprint": "fp",
        "engine": "vllm", "engine_args": "{}", "sampling_params": "{}", "sampling_hash": "sh", "template_hash": "th",
        "scorers": "x", "code_version": "0", "started_at": "2026-01-01 00:00:00+00", "finished_at": "2026-01-01 00:01:00+00",
        "wall_seconds": 60.0, "rows_read": 3, "rejected": 0, "requests": 3, "unique_requests": 2, "duplicates": 1,
        "shards": 1, "cached_shards": 0, "engine_requests": 1, "outputs": 2, "errors": 1, "prompt_tokens": 3,
        "completion_tokens": 4, "generated_tokens": 4, "tokens_per_second": 0.1,
    }
    dataset = {"dataset_version": "dv1", "dataset_name": "t", "source": "f", "spec": "{}", "template_hash": "th",
               "rows_read": 3, "requests": 3, "unique_requests": 2, "rejected": 0}
    shards = [{"shard_key": "s1", "output_key": "o1", "requests": 2, "errors": 1, "prompt_tokens": 3,
               "completion_tokens": 4, "generate_seconds": 1.0, "cached": False}]
    commit_files = CommitFiles(requests=[paths["requests"]], rejected=[], outputs=[paths["outputs"]], scores=[paths["scores"]])
    return run, dataset, shards, commit_files


def test_migrations_are_recorded_and_run_once(tmp_path):
    con = connect(tmp_path / "r.duckdb")
    assert migrate(con) == LATEST_VERSION
    assert migrate(con) == LATEST_VERSION
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(v,) for v, _, _ in MIGRATIONS]
    names = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert set(TABLES) | {"schema_migrations", "run_outputs", "run_summary"} <= names


def test_a_file_from_a_newer_version_is_refused(tmp_path):
    con = connect(tmp_path / "r.duckdb")
    migrate(con)
    con.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
    with pytest.raises(StoreError, match="schema version 999, newer than this code knows"):
        migrate(con)


def test_commit_links_outputs_to_canonical_requests_and_twice_changes_nothing(tmp_path, commit_inputs):
    con = connect(tmp_path / "r.duckdb")
    migrate(con)
    commit_run(con, *commit_inputs)
    first = snapshot(con)
    commit_run(con, *commit_inputs)
    assert snapshot(con) == first
    assert con.execute("SELECT custom_id, error_code FROM outputs ORDER BY custom_id").fetchall() == [
        ("a", None), ("b", "context_length_exceeded")
    ]
    # the duplicate gets its canonical's answer through run_outputs
    assert con.execute("SELECT custom_id, duplicate_of, text FROM run_outputs WHERE request_key = 'k1' ORDER BY 1").fetchall() == [
        ("a", None, "x"), ("c", "a", "x")
    ]
    assert con.execute("SELECT count(*) FROM scores").fetchone() == (3,)  # the error row has no scores


def test_a_failing_commit_leaves_no_partial_rows(tmp_path, commit_inputs):
    run, dataset, shards, commit_files = commit_inputs
    con = connect(tmp_path / "r.duckdb")
    migrate(con)
    before = snapshot(con)
    broken = CommitFiles(commit_files.requests, [], commit_files.outputs, [str(tmp_path / "missing.parquet")])
    with pytest.raises(duckdb.Error):
        commit_run(con, run, dataset, shards, broken)
    assert snapshot(con) == before


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def hold_lock(path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_connect_waits_for_another_process_then_says_what_holds_the_file(tmp_path):
    path = tmp_path / "r.duckdb"
    holder = hold_lock(path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"{path.name} could not be opened for writing within 1s.*(lock|PID)"):
            connect(path, lock_timeout_seconds=1)
        assert time.monotonic() - started >= 1
    finally:
        holder.kill()
        holder.wait()

    holder = hold_lock(path, 1.5)
    try:
        connect(path, lock_timeout_seconds=30).close()  # waits until the holder lets go
    finally:
        holder.wait()
