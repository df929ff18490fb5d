"""Comparison views on a real results file: win rates by each scorer's direction with Wilson intervals,
paired differences with their bootstrap intervals and sign tests, the compare_runs macro; and the
direction of scores stored before it was recorded."""

import duckdb
import pyarrow as pa
import pytest

from tasks import storage
from tasks.config import StoreConfig
from tasks.engines.base import OutputRecord, output_table
from tasks.scoring.compare import BootstrapConfig, sign_test_p_value, wilson_interval
from tasks.scoring.scorers import SCORE_SCHEMA
from tasks.scoring.tasks import compute_differences
from tasks.store.commit import CommitFiles, RunRecord, commit_run, record_comparison, record_differences
from tasks.store.connection import writing
from tasks.store.migrations import MIGRATIONS, migrate

IDS = [f"q{i}" for i in range(10)]
# perplexity (lower is better): b lower on 7 requests, higher on 2, equal on 1 → b wins 7, loses 2, ties 1
PERPLEXITY_A = [5.0, 6.0, 7.0, 8.0, 9.0, 4.0, 5.0, 6.0, 2.0, 3.0]
PERPLEXITY_B = [4.0, 5.0, 6.0, 7.0, 8.0, 3.0, 4.0, 7.0, 3.0, 3.0]
# valid_json (higher is better): b valid on 6, a on 2 of the same requests
VALID_A = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
VALID_B = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
TOKENS_A = [float(i) for i in range(10)]
TOKENS_B = [float(i + 1) for i in range(10)]  # completion_tokens: no direction


def variant_run(tmp_path, rows, run_id: str, fingerprint: str, scores: dict[str, tuple[str, list[float]]]) -> RunRecord:
    """A run of the ten requests on its own model, with the given values per scorer (name → (direction, values))."""
    folder = tmp_path / run_id
    folder.mkdir()
    requests = pa.table(
        {
            "custom_id": IDS,
            "request_key": [f"k{i}" for i in range(10)],
            "prompt": [f"p{i}" for i in range(10)],
            "messages": [None] * 10,
            "overrides": pa.array([None] * 10, pa.string()),
            "source_file": ["f"] * 10,
            "source_row": list(range(10)),
            "duplicate_of": [None] * 10,
            "reference": [None] * 10,
        }
    )
    outputs = output_table([OutputRecord(f"k{i}", text="x", finish_reason="stop", completion_tokens=1) for i in range(10)])
    outputs = outputs.append_column("shard_key", pa.array(["s1"] * 10)).append_column("output_key", pa.array(["o1"] * 10))
    score_rows = [
        {
            "request_key": f"k{i}",
            "sample_index": 0,
            "scorer": name,
            "scorer_version": "1",
            "value": values[i],
            "label": None,
            "direction": direction,
        }
        for name, (direction, values) in scores.items()
        for i in range(10)
    ]
    paths = {name: str(folder / f"{name}.parquet") for name in ("requests", "outputs", "scores")}
    storage.write_parquet(requests, paths["requests"])
    storage.write_parquet(outputs, paths["outputs"])
    storage.write_parquet(pa.Table.from_pylist(score_rows, schema=SCORE_SCHEMA), paths["scores"])
    files = CommitFiles(requests=[paths["requests"]], rejected=[], outputs=[paths["outputs"]], scores=[paths["scores"]])
    run = rows.run(run_id=run_id, model_fingerprint=fingerprint, requests=10, unique_requests=10, duplicates=0)
    return RunRecord(run, rows.dataset(requests=10, unique_requests=10), [rows.shard(run_id=run_id)], files)


@pytest.fixture
def compared(tmp_path, rows, store):
    """Runs ra and rb of one dataset version, recorded as variants a and b of comparison c1."""
    runs = {
        "ra": (
            "fa",
            {"perplexity": ("lower", PERPLEXITY_A), "valid_json": ("higher", VALID_A), "completion_tokens": ("none", TOKENS_A)},
        ),
        "rb": (
            "fb",
            {"perplexity": ("lower", PERPLEXITY_B), "valid_json": ("higher", VALID_B), "completion_tokens": ("none", TOKENS_B)},
        ),
    }
    with writing(store.duckdb_path) as con:
        for run_id, (fingerprint, scores) in runs.items():
            commit_run(con, variant_run(tmp_path, rows, run_id, fingerprint, scores))
        record_comparison(con, "c1", {"a": "ra", "b": "rb"})
    return store


def win_rates(con, scorer: str) -> dict:
    found = con.execute(
        "SELECT variant_a, variant_b, direction, pairs, wins, losses, ties, win_rate, win_rate_ci95_low, win_rate_ci95_high "
        "FROM comparison_win_rates WHERE comparison_id = 'c1' AND scorer = ?",
        [scorer],
    ).fetchall()
    return {(row[0], row[1]): row[2:] for row in found}


def test_win_rates_count_a_lower_value_as_a_win_for_a_lower_is_better_scorer(compared):
    with duckdb.connect(compared.duckdb_path, read_only=True) as con:
        perplexity = win_rates(con, "perplexity")
        direction, pairs, wins, losses, ties, rate, low, high = perplexity[("b", "a")]
        assert (direction, pairs, wins, losses, ties, rate) == ("lower", 10, 7, 2, 1, 0.75)
        assert (low, high) == pytest.approx(wilson_interval(7 + 1 / 2, 10))  # ties count half, in the interval too
        assert perplexity[("a", "b")][2:6] == (2, 7, 1, 0.25)
        # higher is better: b's 6 valid answers where a had none win
        assert win_rates(con, "valid_json")[("b", "a")][:6] == ("higher", 10, 6, 0, 4, 0.8)
        # no direction, no winner: the pairs are there, the rest is null
        assert win_rates(con, "completion_tokens")[("b", "a")] == ("none", 10, None, None, None, None, None, None)
        directions = dict(
            con.execute("SELECT DISTINCT scorer, direction FROM comparison_scores WHERE comparison_id = 'c1'").fetchall()
        )
        assert directions == {"perplexity": "lower", "valid_json": "higher", "completion_tokens": "none"}


def test_paired_differences_are_stored_and_the_compare_runs_macro_shows_them_either_way_round(compared):
    bootstrap = BootstrapConfig(resamples=500, seed=3)
    rows = compute_differences.fn("c1", ["a", "b"], bootstrap, compared)
    with writing(compared.duckdb_path) as con:
        record_differences(con, rows)
        record_differences(con, rows)  # recorded twice: the same rows
        stored = {
            row[0]: row[1:]
            for row in con.execute(
                "SELECT scorer, variant_a, variant_b, direction, pairs, mean_a, mean_b, mean_diff, b_higher, a_higher, p_value "
                "FROM comparison_differences WHERE comparison_id = 'c1'"
            ).fetchall()
        }
        assert stored["perplexity"] == ("a", "b", "lower", 10, 5.5, 5.0, -0.5, 2, 7, pytest.approx(sign_test_p_value(2, 7)))
        assert stored["valid_json"][3:] == (10, 0.2, 0.8, pytest.approx(0.6), 6, 0, pytest.approx(2 / 64))
        assert stored["completion_tokens"][3:] == (10, 4.5, 5.5, 1.0, 10, 0, pytest.approx(2 / 1024))

        forward = con.execute(
            "SELECT scorer, mean_diff, diff_boot_ci95_low, diff_boot_ci95_high, p_value FROM compare_runs('ra', 'rb')"
        ).fetchall()
        backward = con.execute(
            "SELECT scorer, mean_diff, diff_boot_ci95_low, diff_boot_ci95_high, p_value FROM compare_runs('rb', 'ra')"
        ).fetchall()
    by_scorer = {row.scorer: row for row in rows}
    for (scorer, diff, low, high, p), (_, back_diff, back_low, back_high, back_p) in zip(forward, backward):
        assert (low, high, p) == (by_scorer[scorer].diff_ci95_low, by_scorer[scorer].diff_ci95_high, by_scorer[scorer].p_value)
        assert low <= diff <= high
        assert (back_diff, back_low, back_high, back_p) == pytest.approx((-diff, -high, -low, p))
    assert by_scorer["completion_tokens"].diff_ci95_low == by_scorer["completion_tokens"].diff_ci95_high == 1.0


def test_scores_stored_before_directions_get_their_built_in_direction(tmp_path, rows):
    """A file at migration 9 with scores of refusal, chrf, distinct_3, a user scorer: upgraded in place."""
    path = str(tmp_path / "old.duckdb")
    con = duckdb.connect(path)
    con.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
        "applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp)"
    )
    for migration in [m for m in MIGRATIONS if m.version < 10]:
        con.execute(migration.sql)
        con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [migration.version, migration.name])
    for scorer in ("refusal", "chrf", "distinct_3", "shouting", "completion_tokens"):
        con.execute(
            "INSERT INTO scores (output_id, scorer, scorer_version, value, run_id) VALUES ('o', ?, '1', 1, 'r')", [scorer]
        )
    migrate(con)
    assert dict(con.execute("SELECT scorer, direction FROM scores").fetchall()) == {
        "refusal": "lower",
        "chrf": "higher",
        "distinct_3": "higher",
        "shouting": "none",
        "completion_tokens": "none",
    }
    con.close()


def test_a_score_file_without_directions_is_stored_with_none(tmp_path, rows):
    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"))
    record = variant_run(tmp_path, rows, "ra", "fa", {"refusal": ("lower", [0.0] * 10)})
    old_file = str(tmp_path / "old-scores.parquet")
    storage.write_parquet(storage.read_parquet(record.files.scores[0]).drop_columns(["direction"]), old_file)
    files = CommitFiles(record.files.requests, [], record.files.outputs, [old_file])
    with writing(store.duckdb_path) as con:
        commit_run(con, RunRecord(record.run, record.dataset, record.shards, files))
        assert con.execute("SELECT DISTINCT direction FROM scores").fetchall() == [("none",)]
