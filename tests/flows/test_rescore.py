import textwrap

import duckdb
import pytest

from flows.rescore import rescore
from tasks.config import StoreConfig
from tasks.store import StoreError, commit_run, connect, migrate


@pytest.fixture
def store_with_a_run(tmp_path, commit_inputs) -> StoreConfig:
    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "storage"))
    con = connect(store.duckdb_path)
    migrate(con)
    commit_run(con, *commit_inputs)
    con.close()
    return store


def scores(store) -> list[tuple]:
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        return con.execute("SELECT scorer, scorer_version, value, label FROM scores ORDER BY ALL").fetchall()


def test_rescore_adds_new_versions_beside_old_scores_without_inference(prefect_harness, store_with_a_run, tmp_path, monkeypatch):
    (tmp_path / "v2_scorers.py").write_text(
        textwrap.dedent(
            """
            from tasks.score import Scorer, per_row

            completion_tokens = Scorer("completion_tokens", "2", per_row(lambda row: (row["completion_tokens"] * 10.0, None)))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    before = scores(store_with_a_run)

    summary = rescore("r1", ["v2_scorers:completion_tokens", {"name": "regex", "options": {"pattern": "x"}}], store_with_a_run)

    assert (summary.outputs, summary.new_scores) == (2, 2)  # the error row is read but has nothing to score
    after = scores(store_with_a_run)
    assert set(before) < set(after)  # old versions kept
    assert set(after) - set(before) == {("completion_tokens", "2", 40.0, None), ("regex", summary.scorers.split("regex@")[1], 1.0, None)}
    assert rescore("r1", ["v2_scorers:completion_tokens"], store_with_a_run).new_scores == 0  # twice changes nothing
    assert scores(store_with_a_run) == after


def test_rescore_of_an_unknown_run_says_so(prefect_harness, store_with_a_run):
    with pytest.raises(StoreError, match="run nope: not in this results file"):
        rescore("nope", ["valid_json"], store_with_a_run)
