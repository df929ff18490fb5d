"""Curation's reads and writes in the results file: sample selection, annotations, curated rows."""

import json

import pyarrow as pa
import pytest

from tasks import storage
from tasks.config import SampleSelection, StoreConfig
from tasks.curation.curated import curated_record, jsonl_bytes
from tasks.curation.tasks import select_samples as select_samples_task
from tasks.engines.base import OutputRecord, output_table
from tasks.scoring.registry import DEFAULT_SCORERS, resolve_scorers, score_outputs
from tasks.store.commit import CommitFiles, RunRecord, commit_run
from tasks.store.connection import open_for_write
from tasks.store.curation import curated_rows, select_samples, sync_annotations
from tasks.store.rows import AnnotationRow
from tasks.store.sandbox import ConditionError
from tasks.store.sql import StoreError

IDS = [f"q{i}" for i in range(8)]


def commit_fake_run(con, tmp_path, rows, run_id: str, fingerprint: str, texts: list[str | None], tokens: list[int]):
    """A run over q0..q7 (+ q8, a duplicate of q0, and q9, an error) with the given answers."""
    requests = pa.table(
        {
            "custom_id": [*IDS, "q8", "q9"],
            "request_key": [f"k{i}" for i in range(8)] + ["k0", "k9"],
            "prompt": [f"prompt {i}" for i in range(8)] + ["prompt 0", "too long"],
            "messages": [json.dumps([{"role": "user", "content": f"prompt {i}"}]) for i in range(8)] + [None, None],
            "source_file": ["f"] * 10,
            "source_row": list(range(10)),
            "duplicate_of": [None] * 8 + ["q0", None],
            "overrides": pa.array([None] * 10, pa.string()),
            "reference": pa.array([None] * 10, pa.string()),
        }
    )
    outputs = output_table(
        [
            OutputRecord(f"k{i}", text=text, finish_reason="stop", prompt_tokens=3, completion_tokens=n)
            for i, (text, n) in enumerate(zip(texts, tokens))
        ]
        + [OutputRecord.failed("k9", "context_length_exceeded", "long", prompt_tokens=999)]
    )
    scores = score_outputs(outputs, resolve_scorers(DEFAULT_SCORERS))
    outputs = outputs.append_column("shard_key", pa.array(["s"] * 9)).append_column("output_key", pa.array(["o"] * 9))
    paths = {name: str(tmp_path / f"{run_id}-{name}.parquet") for name in ("requests", "outputs", "scores")}
    for name, table in (("requests", requests), ("outputs", outputs), ("scores", scores)):
        storage.write_parquet(table, paths[name])
    run = rows.run(
        run_id=run_id,
        dataset_version="dv",
        model_fingerprint=fingerprint,
        rows_read=10,
        requests=10,
        unique_requests=9,
        engine_requests=9,
        outputs=9,
        errors=1,
        prompt_tokens=27,
        completion_tokens=sum(tokens),
        generated_tokens=sum(tokens),
    )
    dataset = rows.dataset(dataset_version="dv", rows_read=10, requests=10, unique_requests=9)
    files = CommitFiles([paths["requests"]], [], [paths["outputs"]], [paths["scores"]])
    commit_run(con, RunRecord(run, dataset, [], files))


@pytest.fixture
def con(tmp_path, rows):
    con = open_for_write(tmp_path / "results.duckdb")
    texts_a = ["alpha", "", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    texts_b = ["alpha", "", "GAMMA", "delta", "EPS", "zeta", "eta", "THETA"]
    commit_fake_run(con, tmp_path, rows, "A", "fpA", texts_a, [5, 0, 1, 8, 3, 7, 2, 6])
    commit_fake_run(con, tmp_path, rows, "B", "fpB", texts_b, [5, 0, 4, 8, 3, 7, 2, 1])
    yield con
    con.close()


def select(con, **selection) -> list[dict]:
    return select_samples(con, SampleSelection(**selection))


def test_lowest_takes_the_lowest_scores_of_canonical_answers_only(con):
    chosen = select(con, run_id="A", strategy="lowest", scorer="completion_tokens", limit=3)
    assert [row["custom_id"] for row in chosen] == ["q1", "q2", "q6"]  # 0, 1, 2 tokens
    everything = select(con, run_id="A", strategy="lowest", limit=100)
    assert sorted(row["custom_id"] for row in everything) == IDS  # no duplicate q8, no error q9
    scores = json.loads(chosen[0]["scores"])
    assert {k: scores[k] for k in ("completion_tokens", "empty_output", "finish_reason")} == {
        "completion_tokens": 0.0,
        "empty_output": 1.0,
        "finish_reason": 0.0,
    }


def test_stratified_draws_evenly_from_score_buckets_and_repeats_with_the_seed(con):
    # completion_tokens of run A: 0..8 in two equal-width buckets [0, 4) and [4, 8]
    low = {"q1", "q2", "q4", "q6"}
    chosen = select(con, run_id="A", strategy="stratified", buckets=2, limit=4, seed=1)
    ids = [row["custom_id"] for row in chosen]
    assert len(ids) == 4 and len(set(ids) & low) == 2
    assert ids == [row["custom_id"] for row in select(con, run_id="A", strategy="stratified", buckets=2, limit=4, seed=1)]
    draws = {
        tuple(r["custom_id"] for r in select(con, run_id="A", strategy="stratified", buckets=2, limit=2, seed=s))
        for s in range(6)
    }
    assert len(draws) > 1


def test_disagreement_pushes_both_answers_of_the_pairs_that_differ_most(con):
    chosen = select(con, run_id="A", strategy="disagreement", other_run_id="B", scorer="completion_tokens", limit=2)
    # differing answers: q2 (gap 3), q4 (gap 0), q7 (gap 5)
    assert [(row["custom_id"], row["run_id"]) for row in chosen] == [("q7", "A"), ("q7", "B"), ("q2", "A"), ("q2", "B")]


def test_where_filters_on_columns_and_scores(con):
    chosen = select(con, run_id="A", strategy="where", where="scores['empty_output'] = 1 OR response = 'eta'")
    assert [row["custom_id"] for row in chosen] == ["q1", "q6"]


def test_where_cannot_add_a_statement(con, tmp_path):
    with pytest.raises(ConditionError, match="is not a condition: it may not end the query or add statements"):
        select(con, run_id="A", strategy="where", where="true); DROP TABLE runs; SELECT (1")
    assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)


def annotation(annotation_id, custom_id, output_id, verdict, updated_at, corrected=None, cancelled=False, rating=None):
    return AnnotationRow(
        annotation_id=annotation_id,
        task_id=annotation_id,
        project_id=1,
        run_id="A",
        custom_id=custom_id,
        output_id=output_id,
        annotator="rev@example.com",
        verdict=verdict,
        rating=rating,
        corrected_text=corrected,
        cancelled=cancelled,
        created_at="2026-01-01T00:00:00Z",
        updated_at=updated_at,
    )


def test_sync_inserts_then_changes_nothing_until_an_annotation_changes_or_goes(con):
    assert sync_annotations(con, "http://ls", 1, []) == {"pulled": 0, "new": 0, "changed": 0, "unchanged": 0, "removed": 0}
    rows = [
        annotation(1, "q0", "x", "accept", "2026-01-01T00:00:00Z"),
        annotation(2, "q1", "y", "reject", "2026-01-01T00:00:00Z"),
    ]
    assert sync_annotations(con, "http://ls", 1, rows) == {"pulled": 2, "new": 2, "changed": 0, "unchanged": 0, "removed": 0}
    before = con.execute("SELECT * FROM annotations ORDER BY annotation_id").fetchall()
    assert sync_annotations(con, "http://ls", 1, rows) == {"pulled": 2, "new": 0, "changed": 0, "unchanged": 2, "removed": 0}
    assert con.execute("SELECT * FROM annotations ORDER BY annotation_id").fetchall() == before  # pulled_at too
    rows[1] = annotation(2, "q1", "y", "accept", "2026-01-02T00:00:00Z", rating=4)
    assert sync_annotations(con, "http://ls", 1, rows) == {"pulled": 2, "new": 0, "changed": 1, "unchanged": 1, "removed": 0}
    assert con.execute("SELECT verdict, rating FROM annotations WHERE annotation_id = 2").fetchone() == ("accept", 4)
    # annotation 1 was deleted in Label Studio; another project's annotations are not touched
    sync_annotations(
        con, "http://ls", 2, [annotation(9, "q3", "z", "accept", "2026-01-01T00:00:00Z").model_copy(update={"project_id": 2})]
    )
    assert sync_annotations(con, "http://ls", 1, rows[1:]) == {
        "pulled": 1,
        "new": 0,
        "changed": 0,
        "unchanged": 1,
        "removed": 1,
    }
    assert con.execute("SELECT annotation_id FROM annotations ORDER BY 1").fetchall() == [(2,), (9,)]


def curated(con, project=None, runs=()):
    return [curated_record(row) for row in curated_rows(con, project, list(runs))]


def test_curated_records_take_the_latest_review_and_the_corrected_text(con):
    output = dict(con.execute("SELECT custom_id, output_id FROM run_outputs WHERE run_id = 'A'").fetchall())
    sync_annotations(
        con,
        "http://ls",
        1,
        [
            annotation(1, "q0", output["q0"], "accept", "2026-01-01T00:00:00Z", rating=5),
            annotation(2, "q1", output["q1"], "reject", "2026-01-01T00:00:00Z", corrected="fixed answer"),
            annotation(3, "q2", output["q2"], "accept", "2026-01-01T00:00:00Z"),
            annotation(4, "q2", output["q2"], "reject", "2026-01-02T00:00:00Z"),  # the later review wins
            annotation(5, "q3", output["q3"], "accept", "2026-01-03T00:00:00Z", cancelled=True),
            annotation(6, "q3", output["q3"], "reject", "2026-01-01T00:00:00Z"),
        ],
    )
    records = curated(con)
    assert [(r["custom_id"], r["source"]) for r in records] == [("q0", "accepted"), ("q1", "corrected")]
    assert records[0]["messages"] == [{"role": "user", "content": "prompt 0"}, {"role": "assistant", "content": "alpha"}]
    assert records[1]["messages"][-1] == {"role": "assistant", "content": "fixed answer"}
    assert curated(con, runs=["B"]) == [] and curated(con, project="no such project") == []
    lines = jsonl_bytes(records).decode().splitlines()
    assert [json.loads(line)["messages"][-1]["content"] for line in lines] == ["alpha", "fixed answer"]


def test_select_samples_names_a_missing_run_and_a_broken_condition(con, tmp_path):
    con.close()
    store = StoreConfig(duckdb_path=str(tmp_path / "results.duckdb"))
    assert len(select_samples_task.fn(store, SampleSelection(run_id="A", limit=3))) == 3
    with pytest.raises(StoreError, match="run 'nope' is not in"):
        select_samples_task.fn(store, SampleSelection(run_id="nope"))
    with pytest.raises(ValueError, match="where condition 'no_such_column > 1' does not work: .*no_such_column"):
        select_samples_task.fn(store, SampleSelection(run_id="A", strategy="where", where="no_such_column > 1"))
    with pytest.raises(StoreError, match="does not exist: run `vbf run` first"):
        select_samples_task.fn(StoreConfig(duckdb_path=str(tmp_path / "missing.duckdb")), SampleSelection(run_id="A"))
