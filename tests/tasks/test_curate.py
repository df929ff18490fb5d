import json
import xml.etree.ElementTree as ET

import duckdb
import pyarrow as pa
import pytest
from prefect.states import Failed
from pydantic import ValidationError

from tasks import files
from tasks.config import StoreConfig
from tasks.engine import OUTPUT_SCHEMA
from tasks.label_studio import LabelStudioError
from tasks.curate import (
    SampleSelection,
    curated_record,
    jsonl_bytes,
    labeling_config,
    parse_annotation,
    retry_when_transient,
    select_samples,
    selection_sql,
    task_payload,
    sync_annotation_rows,
    version_manifest,
    CURATED_SQL,
)
from tasks.score import DEFAULT_SCORERS, resolve_scorers, score_outputs
from tasks.store import CommitFiles, commit_run, migrate

IDS = [f"q{i}" for i in range(8)]


def commit_fake_run(con, tmp_path, run_id: str, fingerprint: str, texts: list[str | None], tokens: list[int]):
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
    outputs = pa.Table.from_pylist(
        [
            {"request_key": f"k{i}", "sample_index": 0, "text": text, "finish_reason": "stop",
             "prompt_tokens": 3, "completion_tokens": n, "error_code": None, "error": None}
            for i, (text, n) in enumerate(zip(texts, tokens))
        ]
        + [{"request_key": "k9", "sample_index": 0, "text": None, "finish_reason": None, "prompt_tokens": 999,
            "completion_tokens": None, "error_code": "context_length_exceeded", "error": "long"}],
        schema=OUTPUT_SCHEMA,
    )  # fmt: skip
    scores = score_outputs(outputs, resolve_scorers(DEFAULT_SCORERS))
    outputs = outputs.append_column("shard_key", pa.array(["s"] * 9)).append_column("output_key", pa.array(["o"] * 9))
    paths = {name: str(tmp_path / f"{run_id}-{name}.parquet") for name in ("requests", "outputs", "scores")}
    for name, table in (("requests", requests), ("outputs", outputs), ("scores", scores)):
        files.write_parquet(table, paths[name])
    counts = {"rows_read": 10, "rejected": 0, "requests": 10, "unique_requests": 9, "duplicates": 1}
    run = {
        "run_id": run_id, "dataset_version": "dv", "dataset_name": "t", "model": "m", "model_fingerprint": fingerprint,
        "engine": "vllm", "engine_args": "{}", "sampling_params": "{}", "sampling_hash": "sh", "template_hash": "th",
        "scorers": "x", "code_version": "0", "started_at": "2026-01-01 00:00:00+00",
        "finished_at": "2026-01-01 00:01:00+00", "wall_seconds": 60.0, **counts, "shards": 1, "cached_shards": 0,
        "engine_requests": 9, "outputs": 9, "errors": 1, "prompt_tokens": 27, "completion_tokens": sum(tokens),
        "generated_tokens": sum(tokens), "tokens_per_second": 1.0,
    }  # fmt: skip
    dataset = {"dataset_version": "dv", "dataset_name": "t", "source": "f", "spec": "{}", "template_hash": "th",
               "rows_read": 10, "requests": 10, "unique_requests": 9, "rejected": 0}
    commit_run(con, run, dataset, [], CommitFiles([paths["requests"]], [], [paths["outputs"]], [paths["scores"]]))


@pytest.fixture
def con(tmp_path):
    con = duckdb.connect(str(tmp_path / "results.duckdb"))
    migrate(con)
    texts_a = ["alpha", "", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    texts_b = ["alpha", "", "GAMMA", "delta", "EPS", "zeta", "eta", "THETA"]
    commit_fake_run(con, tmp_path, "A", "fpA", texts_a, [5, 0, 1, 8, 3, 7, 2, 6])
    commit_fake_run(con, tmp_path, "B", "fpB", texts_b, [5, 0, 4, 8, 3, 7, 2, 1])
    yield con
    con.close()


def select(con, **selection) -> list[dict]:
    sql, params = selection_sql(SampleSelection(**selection))
    cursor = con.execute(sql, params)
    return [dict(zip([c[0] for c in cursor.description], row)) for row in cursor.fetchall()]


def test_lowest_takes_the_lowest_scores_of_canonical_answers_only(con):
    chosen = select(con, run_id="A", strategy="lowest", scorer="completion_tokens", limit=3)
    assert [row["custom_id"] for row in chosen] == ["q1", "q2", "q6"]  # 0, 1, 2 tokens
    everything = select(con, run_id="A", strategy="lowest", limit=100)
    assert sorted(row["custom_id"] for row in everything) == IDS  # no duplicate q8, no error q9
    scores = json.loads(chosen[0]["scores"])
    assert {k: scores[k] for k in ("completion_tokens", "empty_output", "finish_reason")} == {
        "completion_tokens": 0.0, "empty_output": 1.0, "finish_reason": 0.0
    }


def test_stratified_draws_evenly_from_score_buckets_and_repeats_with_the_seed(con):
    # completion_tokens of run A: 0..8 in two equal-width buckets [0, 4) and [4, 8]
    low = {"q1", "q2", "q4", "q6"}
    chosen = select(con, run_id="A", strategy="stratified", buckets=2, limit=4, seed=1)
    ids = [row["custom_id"] for row in chosen]
    assert len(ids) == 4 and len(set(ids) & low) == 2
    assert ids == [row["custom_id"] for row in select(con, run_id="A", strategy="stratified", buckets=2, limit=4, seed=1)]
    draws = {tuple(r["custom_id"] for r in select(con, run_id="A", strategy="stratified", buckets=2, limit=2, seed=s)) for s in range(6)}
    assert len(draws) > 1


def test_disagreement_pushes_both_answers_of_the_pairs_that_differ_most(con):
    chosen = select(con, run_id="A", strategy="disagreement", other_run_id="B", scorer="completion_tokens", limit=2)
    # differing answers: q2 (gap 3), q4 (gap 0), q7 (gap 5)
    assert [(row["custom_id"], row["run_id"]) for row in chosen] == [("q7", "A"), ("q7", "B"), ("q2", "A"), ("q2", "B")]


def test_where_filters_on_columns_and_scores(con):
    chosen = select(con, run_id="A", strategy="where", where="scores['empty_output'] = 1 OR response = 'eta'")
    assert [row["custom_id"] for row in chosen] == ["q1", "q6"]


def test_where_cannot_write_through_a_read_only_connection(con, tmp_path):
    con.close()
    sql, params = selection_sql(SampleSelection(run_id="A", strategy="where", where="true); DROP TABLE runs; SELECT (1"))
    with duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True) as reader:
        with pytest.raises(duckdb.Error):
            reader.execute(sql, params)
    with duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True) as reader:
        assert reader.execute("SELECT count(*) FROM runs").fetchone() == (2,)


@pytest.mark.parametrize(
    "fields, message",
    [({"strategy": "disagreement"}, "other_run_id"), ({"strategy": "where", "where": " "}, "where"), ({"limit": 0}, "limit")],
)
def test_selection_names_the_missing_input(fields, message):
    with pytest.raises(ValidationError, match=message):
        SampleSelection(run_id="A", **fields)


def test_labeling_config_is_xml_with_the_review_controls():
    view = ET.fromstring(labeling_config('Answers <&> "v2"'))
    names = {element.get("name"): element.tag for element in view.iter() if element.get("name")}
    assert names == {"prompt": "Text", "response": "Text", "scores": "Text", "verdict": "Choices", "rating": "Rating", "corrected": "TextArea"}
    assert [c.get("value") for c in view.iter("Choice")] == ["accept", "reject"]
    assert view.find("Rating").get("maxRating") == "5"


def test_task_payload_prefills_the_verdict_from_scores():
    sample = {"run_id": "A", "custom_id": "q1", "output_id": "o1", "prompt": "hi",
              "messages": json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]),
              "response": "", "scores": json.dumps({"empty_output": 1.0, "completion_tokens": 0.0})}  # fmt: skip
    payload = task_payload(sample, "completion_tokens")
    assert payload["data"]["prompt"] == "[system] Be brief.\n\n[user] hi"
    assert payload["data"]["scores"] == "completion_tokens = 0 · empty_output = 1"
    (prediction,) = payload["predictions"]
    assert prediction["score"] == 0.0 and prediction["result"][0]["value"] == {"choices": ["reject"]}
    fine = task_payload({**sample, "response": "ok", "scores": json.dumps({"empty_output": 0.0})}, "completion_tokens")
    assert fine["predictions"][0]["result"][0]["value"] == {"choices": ["accept"]} and fine["predictions"][0]["score"] is None


# An annotated task as Label Studio 1.23 exports it (trimmed).
EXPORTED_TASK = {
    "id": 7, "project": 3, "data": {"run_id": "A", "custom_id": "q2", "output_id": "o2", "prompt": "p", "response": "r"},
    "annotations": [{
        "id": 11, "completed_by": 1, "was_cancelled": False,
        "created_at": "2026-11-26T21:03:42.885251Z", "updated_at": "2026-11-26T21:04:00.000000Z",
        "result": [
            {"from_name": "verdict", "to_name": "response", "type": "choices", "value": {"choices": ["reject"]}},
            {"from_name": "rating", "to_name": "response", "type": "rating", "value": {"rating": 2}},
            {"from_name": "corrected", "to_name": "response", "type": "textarea", "value": {"text": ["better", "answer"]}},
        ],
    }],
}  # fmt: skip


def test_parse_annotation_reads_verdict_rating_correction_and_annotator():
    row = parse_annotation(3, EXPORTED_TASK, EXPORTED_TASK["annotations"][0], {1: "rev@example.com"})
    assert row == {
        "annotation_id": 11, "task_id": 7, "project_id": 3, "run_id": "A", "custom_id": "q2", "output_id": "o2",
        "annotator": "rev@example.com", "verdict": "reject", "rating": 2, "corrected_text": "better\nanswer",
        "cancelled": False, "created_at": "2026-11-26T21:03:42.885251Z", "updated_at": "2026-11-26T21:04:00.000000Z",
    }  # fmt: skip
    skipped = parse_annotation(3, EXPORTED_TASK, {"id": 12, "completed_by": {"id": 2, "email": "b@x"}, "was_cancelled": True, "result": []}, {})
    assert (skipped["annotator"], skipped["verdict"], skipped["cancelled"]) == ("b@x", None, True)


def annotation(annotation_id, custom_id, output_id, verdict, updated_at, corrected=None, cancelled=False, rating=None):
    return {
        "annotation_id": annotation_id, "task_id": annotation_id, "project_id": 1, "run_id": "A", "custom_id": custom_id,
        "output_id": output_id, "annotator": "rev@example.com", "verdict": verdict, "rating": rating,
        "corrected_text": corrected, "cancelled": cancelled, "created_at": "2026-01-01T00:00:00Z", "updated_at": updated_at,
    }  # fmt: skip


def test_sync_inserts_then_changes_nothing_until_an_annotation_changes_or_goes(con):
    assert sync_annotation_rows(con, "http://ls", 1, []) == {"pulled": 0, "new": 0, "changed": 0, "unchanged": 0, "removed": 0}
    rows = [annotation(1, "q0", "x", "accept", "2026-01-01T00:00:00Z"), annotation(2, "q1", "y", "reject", "2026-01-01T00:00:00Z")]
    assert sync_annotation_rows(con, "http://ls", 1, rows) == {"pulled": 2, "new": 2, "changed": 0, "unchanged": 0, "removed": 0}
    before = con.execute("SELECT * FROM annotations ORDER BY annotation_id").fetchall()
    assert sync_annotation_rows(con, "http://ls", 1, rows) == {"pulled": 2, "new": 0, "changed": 0, "unchanged": 2, "removed": 0}
    assert con.execute("SELECT * FROM annotations ORDER BY annotation_id").fetchall() == before  # pulled_at too
    rows[1] = annotation(2, "q1", "y", "accept", "2026-01-02T00:00:00Z", rating=4)
    assert sync_annotation_rows(con, "http://ls", 1, rows) == {"pulled": 2, "new": 0, "changed": 1, "unchanged": 1, "removed": 0}
    assert con.execute("SELECT verdict, rating FROM annotations WHERE annotation_id = 2").fetchone() == ("accept", 4)
    # annotation 1 was deleted in Label Studio; another project's annotations are not touched
    sync_annotation_rows(con, "http://ls", 2, [{**annotation(9, "q3", "z", "accept", "2026-01-01T00:00:00Z"), "project_id": 2}])
    assert sync_annotation_rows(con, "http://ls", 1, rows[1:]) == {"pulled": 1, "new": 0, "changed": 0, "unchanged": 1, "removed": 1}
    assert con.execute("SELECT annotation_id FROM annotations ORDER BY 1").fetchall() == [(2,), (9,)]


def curated(con, project=None, runs=()):
    cursor = con.execute(CURATED_SQL, {"project": project, "runs": list(runs)})
    return [curated_record(dict(zip([c[0] for c in cursor.description], row))) for row in cursor.fetchall()]


def test_curated_records_take_the_latest_review_and_the_corrected_text(con):
    output = dict(con.execute("SELECT custom_id, output_id FROM run_outputs WHERE run_id = 'A'").fetchall())
    sync_annotation_rows(con, "http://ls", 1, [
        annotation(1, "q0", output["q0"], "accept", "2026-01-01T00:00:00Z", rating=5),
        annotation(2, "q1", output["q1"], "reject", "2026-01-01T00:00:00Z", corrected="fixed answer"),
        annotation(3, "q2", output["q2"], "accept", "2026-01-01T00:00:00Z"),
        annotation(4, "q2", output["q2"], "reject", "2026-01-02T00:00:00Z"),  # the later review wins
        annotation(5, "q3", output["q3"], "accept", "2026-01-03T00:00:00Z", cancelled=True),
        annotation(6, "q3", output["q3"], "reject", "2026-01-01T00:00:00Z"),
    ])  # fmt: skip
    records = curated(con)
    assert [(r["custom_id"], r["source"]) for r in records] == [("q0", "accepted"), ("q1", "corrected")]
    assert records[0]["messages"] == [{"role": "user", "content": "prompt 0"}, {"role": "assistant", "content": "alpha"}]
    assert records[1]["messages"][-1] == {"role": "assistant", "content": "fixed answer"}
    assert curated(con, runs=["B"]) == [] and curated(con, project="no such project") == []
    lines = jsonl_bytes(records).decode().splitlines()
    assert [json.loads(line)["messages"][-1]["content"] for line in lines] == ["alpha", "fixed answer"]


def test_version_hash_depends_only_on_content_and_name():
    records = [{"run_id": "A", "custom_id": "q0", "output_id": "o", "source": "accepted", "rating": None,
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]  # fmt: skip
    first = version_manifest("sft", records)
    assert first == version_manifest("sft", json.loads(json.dumps(records)))
    assert first["counts"] == {"examples": 1, "accepted": 1, "corrected": 0} and first["source_runs"] == ["A"]
    assert version_manifest("other", records)["curated_version"] != first["curated_version"]
    changed = [{**records[0], "messages": [records[0]["messages"][0], {"role": "assistant", "content": "yo!"}]}]
    assert version_manifest("sft", changed)["curated_version"] != first["curated_version"]


def test_select_samples_names_a_missing_run_and_a_broken_condition(con, tmp_path):
    con.close()
    store = StoreConfig(duckdb_path=str(tmp_path / "results.duckdb"))
    assert len(select_samples.fn(store, SampleSelection(run_id="A", limit=3))) == 3
    with pytest.raises(ValueError, match="run 'nope' is not in"):
        select_samples.fn(store, SampleSelection(run_id="nope"))
    with pytest.raises(ValueError, match="where condition 'no_such_column > 1' does not work: .*no_such_column"):
        select_samples.fn(store, SampleSelection(run_id="A", strategy="where", where="no_such_column > 1"))
    with pytest.raises(ValueError, match="does not exist: run batch_inference first"):
        select_samples.fn(StoreConfig(duckdb_path=str(tmp_path / "missing.duckdb")), SampleSelection(run_id="A"))


def test_only_transient_label_studio_errors_are_retried():
    assert retry_when_transient(None, None, Failed(data=LabelStudioError("503 from the server", transient=True)))
    assert not retry_when_transient(None, None, Failed(data=LabelStudioError("401: bad key", transient=False)))
    assert retry_when_transient(None, None, Failed(data=OSError("anything else keeps Prefect's policy")))
