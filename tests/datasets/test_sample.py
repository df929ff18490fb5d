"""The bundled sample has what the pipeline needs to show, and its spec file matches the flow's default."""

from pathlib import Path

import pyarrow.parquet as pq

from tasks.config import SAMPLE_DATASET, DatasetSpec

SAMPLE = Path(__file__).resolve().parents[2] / "datasets" / "sample"


def test_sample_has_enough_varied_rows_with_duplicates_and_blanks():
    rows = pq.read_table(SAMPLE / "prompts.parquet").to_pylist()
    prompts = [row["prompt"] for row in rows]
    assert len(rows) >= 2000
    assert len({row["id"] for row in rows}) == len(rows)
    assert sum(1 for p in prompts if p is None) >= 1 and sum(1 for p in prompts if p is not None and not p.strip()) >= 1
    texts = [p for p in prompts if p and p.strip()]
    assert len(texts) - len(set(texts)) >= 50  # exact duplicates
    normalized = [" ".join(p.lower().split()).rstrip(".!?") for p in texts]
    assert len(set(texts)) - len(set(normalized)) >= 20  # near-duplicates: differ only in case, spacing, punctuation
    assert len({row["category"] for row in rows}) >= 5


def test_spec_file_describes_the_flow_default():
    spec = DatasetSpec.from_yaml(SAMPLE / "spec.yaml")
    assert Path(spec.source).resolve() == Path(SAMPLE_DATASET.source).resolve()
    assert spec.model_dump(exclude={"source"}) == SAMPLE_DATASET.model_dump(exclude={"source"})
