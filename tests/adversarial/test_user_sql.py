"""Hostile `where` conditions (curation selection, export filter) on a real results file: they reach
nothing but the candidate rows, leak no file into a sample, an export or an error, write nothing,
and a runaway one is stopped at its time limit."""

from __future__ import annotations

import threading

import pyarrow.parquet as pq
import pytest

from flows.export_outputs import export_outputs
from tasks.config import SampleSelection, SpecError
from tasks.curation.tasks import select_samples

SECRET = "TOPSECRET-7f3a9c-api-key"


@pytest.fixture
def secret(tmp_path):
    """A file the worker can read, as an environment file or a key would be."""
    path = tmp_path / "secret.env"
    path.write_text(f"{SECRET}\n")
    return path


def hostile_conditions(folder, secret) -> dict[str, str]:
    """Each tries to get out of the candidate rows; `{select}` is the query's own column list (curation vs export)."""
    return {
        # the file's content inside an error message (a failed cast echoes the value)
        "read_text into an error": f"CAST((SELECT content FROM read_text('{secret}')) AS INTEGER) = 1",
        "read_csv into an error": f"""EXISTS (SELECT 1 FROM read_csv('{secret}', header = false, columns = {{'line': 'VARCHAR'}})
                                     WHERE CAST(line AS INTEGER) = 1)""",
        # the file's content inside the rows sent on (a sample pushed to Label Studio, an exported line)
        "read_text into the rows": f"""custom_id = (SELECT CASE WHEN content LIKE 'TOPSECRET%' THEN 'a' END
                                                 FROM read_text('{secret}'))""",
        "glob lists a folder": f"(SELECT count(*) FROM glob('{folder}/*')) > 0",
        "COPY writes a file": f"true); COPY (SELECT 42) TO '{folder}/written.csv'; SELECT (1",
        "ATTACH another database": f"true); ATTACH '{folder}/other.duckdb' AS other; SELECT (1",
        "LOAD an extension": "true); LOAD httpfs; SELECT (1",
        "SET turns access back on": "true); SET enable_external_access = true; SELECT (1",
    }


def assert_nothing_reached(folder, before: set, outcome: str) -> None:
    assert SECRET not in outcome
    assert set(folder.iterdir()) == before  # nothing written beside the results file (no COPY, no ATTACH file)


@pytest.mark.parametrize("kind", list(hostile_conditions("f", "s")))
def test_a_curation_condition_reaches_only_the_candidates(committed_store, snapshot, tmp_path, secret, kind):
    where = hostile_conditions(tmp_path, secret)[kind]
    stored = snapshot(committed_store)
    before = set(tmp_path.iterdir())

    with pytest.raises(ValueError) as raised:  # SpecError, a ValueError
        samples = select_samples.fn(committed_store, SampleSelection(run_id="r1", strategy="where", where=where))
        pytest.fail(f"the condition ran and returned {samples}")

    assert_nothing_reached(tmp_path, before, str(raised.value) + repr(raised.value.__cause__))
    assert "may use only the candidate columns" in str(raised.value) or "is not a condition" in str(raised.value)
    assert snapshot(committed_store) == stored


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["read_text into an error", "read_text into the rows", "glob lists a folder", "COPY writes a file"]
)
def test_an_export_filter_reaches_only_the_candidates(prefect_harness, committed_store, snapshot, tmp_path, secret, kind):
    where = hostile_conditions(tmp_path, secret)[kind]
    stored = snapshot(committed_store)
    out = tmp_path / "out"

    with pytest.raises(SpecError) as raised:
        export_outputs(str(out), where=where, store=committed_store)
    exported = "".join(path.read_text(errors="replace") for path in out.rglob("*") if path.is_file()) if out.exists() else ""

    assert SECRET not in str(raised.value) and SECRET not in exported
    assert not (tmp_path / "written.csv").exists()
    published = [path.name for path in out.iterdir() if path.name != ".latest.lock"] if out.exists() else []
    assert not published  # a refused filter publishes no file (the export's lock file is no export)
    assert snapshot(committed_store) == stored


def test_a_runaway_condition_is_stopped_at_its_time_limit(committed_store):
    store = committed_store.model_copy(update={"condition_timeout_seconds": 1})
    endless = "(SELECT count(*) FROM range(1000000000000) t WHERE t.range % 7 = 3) > 0"
    outcome = []

    def select() -> None:
        try:
            select_samples.fn(store, SampleSelection(run_id="r1", strategy="where", where=endless))
        except SpecError as error:
            outcome.append(error)

    worker = threading.Thread(target=select, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the condition was still running after 30 s"
    assert "took longer than 1s and was stopped" in str(outcome[0])


def test_an_ordinary_condition_still_selects(committed_store, prefect_harness, tmp_path):
    """The sandbox takes away the files, not the columns: scores, subqueries over the candidates, functions."""
    where = "scores['completion_tokens'] >= 4 AND custom_id IN (SELECT min(custom_id) FROM candidates)"
    samples = select_samples.fn(committed_store, SampleSelection(run_id="r1", strategy="where", where=where))
    assert [sample["custom_id"] for sample in samples] == ["a"]

    (parquet,) = export_outputs(
        str(tmp_path / "out"),
        where="scores['finish_reason'] IS NOT NULL AND upper(text) = 'X'",
        formats=["parquet"],
        store=committed_store,
    )
    table = pq.read_table(parquet.path)
    assert sorted(table["custom_id"].to_pylist()) == ["a", "c"] and "scores" not in table.column_names
