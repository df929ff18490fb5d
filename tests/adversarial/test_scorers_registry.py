"""A scorer's name comes from whoever starts a flow: it selects from the registry and never makes
the flow import or call anything else."""

import pytest

from flows.rescore import rescore
from tasks.config import SpecError

pytestmark = pytest.mark.slow  # whole flows (no vLLM)

SCORES = "SELECT scorer, scorer_version, value FROM scores ORDER BY ALL"
# A module on sys.path that no package registers: importing it leaves a mark, calling it another.
NOT_REGISTERED = """
from pathlib import Path

Path(__file__).with_name("imported").touch()


def leave_mark(path):
    Path(path).touch()
"""


@pytest.mark.parametrize(
    "name, options",
    [
        ("os:system", {"command": "touch {marker}"}),
        ("subprocess:run", {"args": ["touch", "{marker}"]}),
        ("planted:leave_mark", {"path": "{marker}"}),
    ],
)
def test_a_scorer_named_by_any_import_path_is_refused_before_anything_runs(
    prefect_harness, committed_store, query, tmp_path, monkeypatch, name, options
):
    (tmp_path / "planted.py").write_text(NOT_REGISTERED)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "marker"
    options = {key: format_all(value, marker) for key, value in options.items()}
    before = query(committed_store, SCORES)

    with pytest.raises(SpecError) as refused:
        rescore("r1", [{"name": name, "options": options}], committed_store)

    assert not marker.exists()  # nothing was called
    assert not (tmp_path / "imported").exists()  # nothing was even imported
    refused.match(f"scorer {name}: not a built-in .* nor a registered user scorer")
    assert query(committed_store, SCORES) == before


def format_all(value, marker):
    return [format_all(item, marker) for item in value] if isinstance(value, list) else value.format(marker=marker)


def test_a_registered_entry_that_is_no_scorer_is_not_called(prefect_harness, committed_store, tmp_path, install_scorers):
    """A package may register anything; only a Scorer or a @scorer_factory function is ever called."""
    install_scorers(
        "sloppy_scorers",
        """
        from pathlib import Path

        def leave_mark(path):
            Path(path).touch()
        """,
        {"sloppy": "sloppy_scorers:leave_mark"},
    )
    marker = tmp_path / "marker"
    with pytest.raises(SpecError) as refused:
        rescore("r1", [{"name": "sloppy", "options": {"path": str(marker)}}], committed_store)
    assert not marker.exists()
    refused.match("scorer sloppy: sloppy_scorers:leave_mark is function, not a Scorer")


def test_a_registered_user_scorer_scores_a_stored_run(prefect_harness, committed_store, query, install_scorers):
    install_scorers(
        "team_scorers",
        """
        from tasks.scoring.scorers import Scorer, per_row, scorer_factory

        @scorer_factory
        def longer_than(tokens):
            return Scorer("longer_than", f"1+{tokens}", per_row(lambda row: (float(row["completion_tokens"] > tokens), None)))
        """,
        {"longer_than": "team_scorers:longer_than"},
    )
    summary = rescore("r1", [{"name": "longer_than", "options": {"tokens": 3}}], committed_store)
    assert summary.new_scores == 1
    assert ("longer_than", "1+3", 1.0) in query(committed_store, SCORES)
