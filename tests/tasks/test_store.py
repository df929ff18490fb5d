import subprocess
import sys
import textwrap
import time

import duckdb
import pytest

from tasks.store import LATEST_VERSION, MIGRATIONS, CommitFiles, StoreError, commit_run, connect, insert_row, migrate

TABLES = ["dataset_versions", "requests", "rejected_rows", "runs", "run_shards", "outputs", "scores"]


def snapshot(con) -> dict:
    return {t: sorted(map(repr, con.execute(f"SELECT * EXCLUDE (created_at) FROM {t}" if t in ("outputs", "scores", "dataset_versions") else f"SELECT * FROM {t}").fetchall())) for t in TABLES}


def test_migrations_are_recorded_and_run_once(tmp_path):
    con = connect(tmp_path / "r.duckdb")
    assert migrate(con) == LATEST_VERSION
    assert migrate(con) == LATEST_VERSION
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(v,) for v, _, _ in sorted(MIGRATIONS)]
    names = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert set(TABLES) | {"schema_migrations", "run_outputs", "run_summary", "latest_outputs", "output_lineage"} <= names


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


def test_with_fan_out_off_duplicates_keep_their_pointer_but_get_no_answer(tmp_path, commit_inputs):
    run, dataset, shards, commit_files = commit_inputs
    con = connect(tmp_path / "r.duckdb")
    migrate(con)
    commit_run(con, {**run, "fan_out": False}, dataset, shards, commit_files)
    assert con.execute("SELECT custom_id FROM run_outputs ORDER BY 1").fetchall() == [("a",), ("b",)]
    assert con.execute("SELECT duplicate_of FROM requests WHERE custom_id = 'c'").fetchone() == ("a",)


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


def apply_first_migration_only(con) -> None:
    version, name, sql = MIGRATIONS[0]
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp)")  # fmt: skip
    con.execute(sql)
    con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])


def rows_of(con, columns: dict[str, list[str]]) -> dict:
    return {t: sorted(map(repr, con.execute(f"SELECT {', '.join(cs)} FROM {t}").fetchall())) for t, cs in columns.items()}


def test_a_file_from_migration_1_is_upgraded_in_place_and_keeps_its_rows(tmp_path, commit_inputs):
    run, dataset, shards, commit_files = commit_inputs
    path = tmp_path / "old.duckdb"
    con = connect(path)
    apply_first_migration_only(con)
    insert_row(con, "dataset_versions", dataset)
    con.execute("INSERT INTO requests SELECT 'dv1', custom_id, request_key, prompt, messages, duplicate_of, source_file, "
                "source_row FROM read_parquet(?)", [commit_files.requests[0]])  # fmt: skip
    con.execute("INSERT INTO outputs SELECT md5(request_key), request_key, 'fp', 'sh', sample_index, 'r1', 'dv1', "
                "CASE request_key WHEN 'k1' THEN 'a' ELSE 'b' END, shard_key, output_key, text, finish_reason, "
                "prompt_tokens, completion_tokens, error_code, error, current_timestamp FROM read_parquet(?)",
                [commit_files.outputs[0]])  # fmt: skip
    insert_row(con, "runs", run)
    columns = {t: [c[0] for c in con.execute(f"DESCRIBE {t}").fetchall() if c[0] != "created_at"] for t in TABLES}
    before = rows_of(con, columns)
    con.close()

    con = connect(path)
    assert migrate(con) == LATEST_VERSION
    assert rows_of(con, columns) == before  # the old columns keep their rows; new columns are null
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(v,) for v, _, _ in sorted(MIGRATIONS)]
    assert con.execute("SELECT count(*), count(reference) FROM requests").fetchone() == (3, 0)
    assert con.execute("SELECT custom_id, source_file, source_row, shard_key FROM output_lineage ORDER BY 1").fetchall() == [
        ("a", "f", 0, "s1"), ("b", "f", 1, "s1")
    ]
    commit_run(con, *commit_inputs)  # the upgraded file takes new commits
    assert con.execute("SELECT count(reference) FROM requests").fetchone() == (0,)  # existing rows are not rewritten


def test_migrations_numbered_in_parallel_all_apply(tmp_path, monkeypatch):
    """A file made by a branch that had migrations 1 and 3 still gets the 2 merged in later."""
    import tasks.store as store

    con = connect(tmp_path / "r.duckdb")
    monkeypatch.setattr(store, "MIGRATIONS", [m for m in MIGRATIONS if m[0] in (1, 3)])
    store.migrate(con)
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(1,), (3,)]
    monkeypatch.undo()
    assert store.migrate(con) == LATEST_VERSION
    assert (2,) in con.execute("SELECT version FROM schema_migrations").fetchall()
    assert "mean_logprob" in {row[0] for row in con.execute("DESCRIBE outputs").fetchall()}


def second_run(run: dict, run_id: str, started_at: str) -> dict:
    return {**run, "run_id": run_id, "started_at": started_at, "finished_at": started_at, "cached_shards": 1}


def test_views_summarize_trace_and_compare_runs(tmp_path, commit_inputs):
    run, dataset, shards, commit_files = commit_inputs
    con = connect(tmp_path / "r.duckdb")
    migrate(con)
    commit_run(con, *commit_inputs)
    commit_run(con, second_run(run, "r2", "2026-01-02 00:00:00+00"), dataset, shards, commit_files)

    error_rate, mean_scores = con.execute("SELECT error_rate, mean_scores FROM run_summary WHERE run_id = 'r1'").fetchone()
    assert error_rate == 0.5
    assert mean_scores == {"completion_tokens@1": 4.0, "empty_output@1": 0.0, "finish_reason@1": 1.0}
    assert con.execute("SELECT n, unscored, mean FROM run_scores WHERE run_id = 'r1' AND scorer = 'completion_tokens'").fetchone() == (1, 0, 4.0)
    # the newest run's answer per custom_id and model; the duplicate 'c' gets its canonical's answer
    assert con.execute("SELECT custom_id, run_id, produced_by_run_id FROM latest_outputs ORDER BY 1").fetchall() == [
        ("a", "r2", "r1"), ("b", "r2", "r1"), ("c", "r2", "r1")
    ]
    (row,) = con.execute("SELECT scorer, pairs, mean_a, mean_b, mean_diff FROM compare_runs('r1', 'r2') WHERE scorer = 'completion_tokens'").fetchall()
    assert row == ("completion_tokens", 1, 4.0, 4.0, 0.0)
    insert_row(con, "runs", {**second_run(run, "r3", "2026-01-03 00:00:00+00"), "dataset_version": "other"})
    with pytest.raises(duckdb.Error, match="r1 and r3 are on different dataset versions"):
        con.execute("SELECT * FROM compare_runs('r1', 'r3')").fetchall()


COMMIT_WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime, timezone
    from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, StoreConfig
    from tasks.infer import ShardOutput
    from tasks.prepare import RequestSet
    from tasks.report import RunSummary
    from tasks.store import commit_results

    db, inputs, prefix, runs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    request_set = RequestSet(dataset_version=inputs["dataset_version"], template_hash="th", request_files=inputs["requests"],
                             rejected_files=[], rows_read=3, requests=3, unique_requests=2, rejected=0)
    output = ShardOutput(shard_key="s1", output_key="o1", path=inputs["outputs"], requests=2, outputs=2, errors=1,
                         prompt_tokens=3, completion_tokens=4, generate_seconds=1.0, batch_size=2, max_num_seqs=None,
                         engine_load_seconds=0.0)
    scorers = ["completion_tokens", "finish_reason", "empty_output"]
    import duckdb
    real_connect, waits = duckdb.connect, []

    def counting_connect(*args, **kwargs):  # counts how often the other process held the file
        try:
            return real_connect(*args, **kwargs)
        except duckdb.IOException:
            waits.append(1)
            raise

    duckdb.connect = counting_connect
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(runs):
        summary = RunSummary(run_id=f"{prefix}-{i}", dataset_name="t", dataset_version=inputs["dataset_version"],
                             model="m", engine="vllm", model_fingerprint="fp", stage_seconds={}, rows_read=3, rejected=0, requests=3, unique_requests=2,
                             duplicates=1, shards=1, cached_shards=0, engine_requests=1, outputs=2, errors=1,
                             prompt_tokens=3, completion_tokens=4, generated_tokens=4, tokens_per_second=1.0,
                             wall_seconds=1.0, duckdb_path=db)
        commit_results.fn(summary, DatasetSpec(name="t", source="f", id_column="id", prompt_column="prompt"),
                          ModelConfig(model="m"), SamplingConfig(), scorers, request_set, [output], [False],
                          inputs["scores"], datetime.now(timezone.utc), StoreConfig(duckdb_path=db, lock_timeout_seconds=120))
    print(f"done {len(waits)}", flush=True)
    """
)


def test_two_processes_committing_to_one_file_at_once_both_land_without_duplicates(tmp_path, commit_inputs):
    """DuckDB allows one writing process: each commit waits for the other's lock and retries."""
    import json
    import os

    _, _, _, commit_files = commit_inputs
    db = tmp_path / "shared.duckdb"
    runs_each = 20
    workers = []
    for prefix, dataset_version in (("left", "dv-left"), ("right", "dv-right")):
        inputs = {"dataset_version": dataset_version, "requests": commit_files.requests, "outputs": commit_files.outputs[0],
                  "scores": commit_files.scores}  # fmt: skip
        workers.append(subprocess.Popen(
            [sys.executable, "-c", COMMIT_WORKER, str(db), json.dumps(inputs), prefix, str(runs_each)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ},
        ))  # fmt: skip
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready"
    for worker in workers:  # start together
        worker.stdin.write("go\n")
        worker.stdin.flush()
    waits = 0
    for worker in workers:
        done, count = worker.stdout.readline().split()
        assert done == "done" and worker.wait(timeout=300) == 0
        waits += int(count)
    assert waits > 0  # the two really overlapped: each waited for the other at least once

    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT run_id) FROM runs").fetchone() == (2 * runs_each, 2 * runs_each)
        # the same content under two dataset versions: one output per content, written once
        assert con.execute("SELECT count(*), count(DISTINCT output_id) FROM outputs").fetchone() == (2, 2)
        assert con.execute("SELECT count(*) FROM requests").fetchone() == (6,)
        assert con.execute("SELECT count(*) FROM run_shards").fetchone() == (2 * runs_each,)
        assert con.execute("SELECT count(*) FROM (SELECT run_id FROM run_outputs GROUP BY run_id HAVING count(*) = 3)").fetchone() == (2 * runs_each,)
