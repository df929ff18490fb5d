"""Commits: one transaction per run, idempotent, all or nothing; two processes committing at once."""

import json
import os
import subprocess
import sys
import textwrap

import duckdb
import pytest

from tasks.store.commit import CommitFiles, RunRecord, commit_run
from tasks.store.connection import writing
from tasks.store.sql import insert_rows

NO_CREATED_AT = ("created_at",)  # set by the clock at insert


def test_commit_links_outputs_to_canonical_requests_and_twice_changes_nothing(store, commit_inputs, snapshot):
    with writing(store.duckdb_path) as con:
        commit_run(con, commit_inputs)
    first = snapshot(store, exclude=NO_CREATED_AT)
    with writing(store.duckdb_path) as con:
        commit_run(con, commit_inputs)
        assert con.execute("SELECT custom_id, error_code FROM outputs ORDER BY custom_id").fetchall() == [
            ("a", None),
            ("b", "context_length_exceeded"),
        ]
        # the duplicate gets its canonical's answer through run_outputs
        assert con.execute(
            "SELECT custom_id, duplicate_of, text FROM run_outputs WHERE request_key = 'k1' ORDER BY 1"
        ).fetchall() == [("a", None, "x"), ("c", "a", "x")]
        assert con.execute("SELECT count(*) FROM scores").fetchone() == (3,)  # the error row has no scores
    assert snapshot(store, exclude=NO_CREATED_AT) == first


def test_with_fan_out_off_duplicates_keep_their_pointer_but_get_no_answer(store, commit_inputs, rows):
    record = RunRecord(rows.run(fan_out=False), commit_inputs.dataset, commit_inputs.shards, commit_inputs.files)
    with writing(store.duckdb_path) as con:
        commit_run(con, record)
        assert con.execute("SELECT custom_id FROM run_outputs ORDER BY 1").fetchall() == [("a",), ("b",)]
        assert con.execute("SELECT duplicate_of FROM requests WHERE custom_id = 'c'").fetchone() == ("a",)


def test_a_failing_commit_leaves_no_partial_rows(store, commit_inputs, snapshot, tmp_path):
    writing(store.duckdb_path).__enter__().close()  # an empty, migrated file
    before = snapshot(store)
    files = commit_inputs.files
    broken = CommitFiles(files.requests, [], files.outputs, [str(tmp_path / "missing.parquet")])
    with writing(store.duckdb_path) as con, pytest.raises(FileNotFoundError, match="missing.parquet"):
        commit_run(con, RunRecord(commit_inputs.run, commit_inputs.dataset, commit_inputs.shards, broken))
    assert snapshot(store) == before


def test_views_summarize_trace_and_compare_runs(store, commit_inputs, rows):
    second = rows.run(
        run_id="r2", started_at="2026-01-02T00:00:00+00:00", finished_at="2026-01-02T00:00:00+00:00", cached_shards=1
    )
    with writing(store.duckdb_path) as con:
        commit_run(con, commit_inputs)
        commit_run(con, RunRecord(second, commit_inputs.dataset, commit_inputs.shards, commit_inputs.files))

        error_rate, mean_scores = con.execute("SELECT error_rate, mean_scores FROM run_summary WHERE run_id = 'r1'").fetchone()
        assert error_rate == 0.5
        assert mean_scores == {"completion_tokens@1": 4.0, "empty_output@1": 0.0, "finish_reason@1": 1.0}
        assert con.execute(
            "SELECT n, unscored, mean FROM run_scores WHERE run_id = 'r1' AND scorer = 'completion_tokens'"
        ).fetchone() == (1, 0, 4.0)
        # the newest run's answer per custom_id and model; the duplicate 'c' gets its canonical's answer
        assert con.execute("SELECT custom_id, run_id, produced_by_run_id FROM latest_outputs ORDER BY 1").fetchall() == [
            ("a", "r2", "r1"),
            ("b", "r2", "r1"),
            ("c", "r2", "r1"),
        ]
        (row,) = con.execute(
            "SELECT scorer, pairs, mean_a, mean_b, mean_diff FROM compare_runs('r1', 'r2') WHERE scorer = 'completion_tokens'"
        ).fetchall()
        assert row == ("completion_tokens", 1, 4.0, 4.0, 0.0)
        insert_rows(con, "runs", [rows.run(run_id="r3", started_at="2026-01-03T00:00:00+00:00", dataset_version="other")])
        with pytest.raises(duckdb.Error, match="r1 and r3 are on different dataset versions"):
            con.execute("SELECT * FROM compare_runs('r1', 'r3')").fetchall()


COMMIT_WORKER = textwrap.dedent(
    """
    import json, sys
    import duckdb
    from tasks.config import StoreConfig
    from tasks.store.commit import CommitFiles, RunRecord
    from tasks.store.rows import DatasetVersionRow, RunRow, RunShardRow
    from tasks.store.tasks import commit_results

    db, inputs, prefix, runs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    run, dataset, shard = (json.loads(inputs[name]) for name in ("run", "dataset", "shard"))
    files = CommitFiles(requests=inputs["requests"], rejected=[], outputs=[inputs["outputs"]], scores=inputs["scores"])
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
        run_id = f"{prefix}-{i}"
        record = RunRecord(
            RunRow(**{**run, "run_id": run_id, "dataset_version": inputs["dataset_version"]}),
            DatasetVersionRow(**{**dataset, "dataset_version": inputs["dataset_version"]}),
            [RunShardRow(**{**shard, "run_id": run_id})],
            files,
        )
        commit_results.fn(record, StoreConfig(duckdb_path=db, lock_timeout_seconds=120))
    print(f"done {len(waits)}", flush=True)
    """
)


def test_two_processes_committing_to_one_file_at_once_both_land_without_duplicates(tmp_path, commit_inputs, query):
    """DuckDB allows one writing process: each commit waits for the other's lock and retries."""
    db = tmp_path / "shared.duckdb"
    runs_each = 20
    workers = []
    for prefix, dataset_version in (("left", "dv-left"), ("right", "dv-right")):
        inputs = {
            "dataset_version": dataset_version,
            "requests": commit_inputs.files.requests,
            "outputs": commit_inputs.files.outputs[0],
            "scores": commit_inputs.files.scores,
            "run": commit_inputs.run.model_dump_json(),
            "dataset": commit_inputs.dataset.model_dump_json(),
            "shard": commit_inputs.shards[0].model_dump_json(),
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", COMMIT_WORKER, str(db), json.dumps(inputs), prefix, str(runs_each)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ},
            )
        )
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

    assert query(db, "SELECT count(*), count(DISTINCT run_id) FROM runs") == [(2 * runs_each, 2 * runs_each)]
    # the same content under two dataset versions: one output per content, written once
    assert query(db, "SELECT count(*), count(DISTINCT output_id) FROM outputs") == [(2, 2)]
    assert query(db, "SELECT count(*) FROM requests") == [(6,)]
    assert query(db, "SELECT count(*) FROM run_shards") == [(2 * runs_each,)]
    assert query(db, "SELECT count(*) FROM (SELECT run_id FROM run_outputs GROUP BY run_id HAVING count(*) = 3)") == [
        (2 * runs_each,)
    ]
