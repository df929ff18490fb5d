import pytest

from blocks.store import ResultsStore
from flows.rescore import rescore
from tasks.store.sql import StoreError

pytestmark = pytest.mark.slow  # whole flows (no vLLM)

SCORES = "SELECT scorer, scorer_version, value, label FROM scores ORDER BY ALL"


def test_rescore_adds_new_versions_beside_old_scores_without_inference(prefect_harness, committed_store, query, install_scorers):
    install_scorers(
        "v2_scorers",
        """
        from tasks.scoring.scorers import Scorer, per_row

        completion_tokens = Scorer("completion_tokens", "2", per_row(lambda row: (row["completion_tokens"] * 10.0, None)))
        """,
        {"completion_tokens_v2": "v2_scorers:completion_tokens"},
    )
    before = query(committed_store, SCORES)
    ResultsStore(config=committed_store).save("rescored-results", overwrite=True)  # named by block, as the deployment does

    summary = rescore("r1", ["completion_tokens_v2", {"name": "regex", "options": {"pattern": "x"}}], "rescored-results")

    assert (summary.outputs, summary.new_scores) == (2, 2)  # the error row is read but has nothing to score
    after = query(committed_store, SCORES)
    assert set(before) < set(after)  # old versions kept
    assert set(after) - set(before) == {
        ("completion_tokens", "2", 40.0, None),
        ("regex", summary.scorers.split("regex@")[1], 1.0, None),
    }
    assert rescore("r1", ["v2_scorers:completion_tokens"], committed_store).new_scores == 0  # twice changes nothing
    assert query(committed_store, SCORES) == after


def test_rescore_of_an_unknown_run_says_so(prefect_harness, committed_store):
    with pytest.raises(StoreError, match="run nope: not in this results file"):
        rescore("nope", ["valid_json"], committed_store)
