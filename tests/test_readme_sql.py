"""Docs that cannot rot: every SQL block in the README runs against a database the flows made."""

import re
from pathlib import Path

import duckdb
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# Queries that may rightly return nothing on the tiny random model: its judge rarely gives a score.
MAY_BE_EMPTY = ("scorer = 'judge' AND comparison_id",)


def readme_statements() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), re.DOTALL)
    with duckdb.connect() as con:
        return [statement.query for block in blocks for statement in con.extract_statements(block)]


def test_the_readme_has_at_least_ten_queries():
    assert len(readme_statements()) >= 10


@pytest.mark.slow
def test_every_readme_query_runs_against_a_database_made_by_the_flows(prefect_harness, tiny_model, reference_slice, tmp_path):
    from flows.compare_runs import compare_runs
    from tasks.compare import Variant
    from tasks.config import SamplingConfig, ShardingConfig, StoreConfig
    from tasks.score import DEFAULT_SCORERS, ScorerSpec

    store = StoreConfig(duckdb_path=str(tmp_path / "r.duckdb"), storage=str(tmp_path / "storage"))
    compare_runs(  # two batch_inference runs of the slice, scored with a judge too, and their comparison
        variants=[Variant(name="greedy"), Variant(name="sampled", sampling=SamplingConfig(temperature=1.0, seed=3, max_tokens=8))],
        dataset=reference_slice,
        model=tiny_model,
        sampling=SamplingConfig(max_tokens=8),
        sharding=ShardingConfig(shard_size=16),
        store=store,
        scorers=[*DEFAULT_SCORERS, ScorerSpec(name="judge", options={"model": tiny_model.model_dump(), "sampling": {"max_tokens": 8}})],
    )

    empty = []
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        for statement in readme_statements():
            rows = con.execute(statement).fetchall()
            if not rows and not any(marker in statement for marker in MAY_BE_EMPTY):
                empty.append(statement)
    assert empty == []
