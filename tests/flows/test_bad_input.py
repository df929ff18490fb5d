"""Bad input through the whole flow: a clear error (DuckDB untouched) or located rejected rows (nothing lost)."""

import json
import shutil

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, SamplingConfig, ShardingConfig, SpecError, StoreConfig, ValidationConfig

pytestmark = pytest.mark.slow

TABLES = ["dataset_versions", "requests", "rejected_rows", "runs", "run_shards", "outputs", "scores", "schema_migrations"]


def run(dataset, model, store):
    return batch_inference(
        dataset=dataset, model=model, sampling=SamplingConfig(max_tokens=4), sharding=ShardingConfig(shard_size=32), store=store
    )


@pytest.fixture(scope="module")
def seeded(prefect_harness, tiny_model, tmp_path_factory):
    """A results file with one good run in it."""
    folder = tmp_path_factory.mktemp("seeded")
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": ["one", "two", "three"]}), folder / "good.parquet")
    store = StoreConfig(duckdb_path=str(folder / "results.duckdb"), storage=str(folder / "storage"))
    run(DatasetSpec(name="good", source=str(folder / "good.parquet"), id_column="id", prompt_column="prompt"), tiny_model, store)
    return store


@pytest.fixture
def store(seeded, tmp_path) -> StoreConfig:
    shutil.copy(seeded.duckdb_path, tmp_path / "results.duckdb")
    return StoreConfig(duckdb_path=str(tmp_path / "results.duckdb"), storage=seeded.storage)


def spec(source, **fields) -> DatasetSpec:
    return DatasetSpec(**{"name": "bad", "source": str(source), "id_column": "id", "prompt_column": "prompt", **fields})


def parquet(path, table):
    pq.write_table(table, path)
    return path


def damaged_page(path):
    rows = pa.table({"id": list(range(2000)), "prompt": [f"prompt text number {i} " * 5 for i in range(2000)]})
    pq.write_table(rows, path, compression="snappy")
    data = bytearray(path.read_bytes())
    data[1000:1064] = b"\xff" * 64  # inside the first data page; the footer stays intact
    path.write_bytes(bytes(data))
    return path


def truncated_footer(path):
    pq.write_table(pa.table({"id": [1], "prompt": ["x"]}), path)
    path.write_bytes(path.read_bytes()[:-20])
    return path


ERRORS = {
    "missing file": (lambda d: d / "nope.parquet", {}, r"nope\.parquet: no such file"),
    "not parquet": (
        lambda d: (d / "x.parquet").write_text("id,prompt\n1,hi\n") and d / "x.parquet",
        {},
        r"x\.parquet: not a readable Parquet file",
    ),
    "truncated footer": (lambda d: truncated_footer(d / "x.parquet"), {}, r"x\.parquet: not a readable Parquet file"),
    "damaged page": (lambda d: damaged_page(d / "x.parquet"), {}, r"x\.parquet: damaged Parquet data after row 0"),
    "empty file": (
        lambda d: (d / "x.parquet").write_bytes(b"") or d / "x.parquet",
        {},
        r"x\.parquet: not a readable Parquet file \(the file is empty\)",
    ),
    "zero rows": (
        lambda d: parquet(d / "x.parquet", pa.table({"id": pa.array([], pa.int64()), "prompt": pa.array([], pa.string())})),
        {},
        r"has no rows",
    ),
    "missing prompt column": (
        lambda d: parquet(d / "x.parquet", pa.table({"id": [1], "text": ["hi"]})),
        {},
        r"x\.parquet has no column 'prompt'",
    ),
    "missing id column": (
        lambda d: parquet(d / "x.parquet", pa.table({"key": [1], "prompt": ["hi"]})),
        {},
        r"x\.parquet has no column 'id'",
    ),
    "wrong prompt type": (
        lambda d: parquet(d / "x.parquet", pa.table({"id": [1], "prompt": [3]})),
        {},
        r"x\.parquet: prompt column 'prompt' is int64, not text",
    ),
    "wrong id type": (
        lambda d: parquet(d / "x.parquet", pa.table({"id": [1.5], "prompt": ["hi"]})),
        {},
        r"x\.parquet: id column 'id' is double",
    ),
    "struct prompt": (
        lambda d: parquet(d / "x.parquet", pa.table({"id": [1], "prompt": [{"text": "hi"}]})),
        {},
        r"prompt column 'prompt' is struct<text: string>, not text",
    ),
    "jsonl without the prompt field": (
        lambda d: (d / "x.jsonl").write_text('{"id": 1, "text": "hi"}\n') and d / "x.jsonl",
        {},
        r"x\.jsonl line 1 has no field 'prompt'",
    ),
    "too many rejected rows": (
        lambda d: parquet(d / "x.parquet", pa.table({"id": [1, 2], "prompt": [None, " "]})),
        {"validation": ValidationConfig(max_rejected_share=0.1)},
        r"2 of 2 rows rejected \(100\.0%\), more than validation\.max_rejected_share",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_fails_clearly_and_leaves_duckdb_as_it_was(case, tiny_model, store, tmp_path, snapshot):
    make, fields, message = ERRORS[case]
    before = snapshot(store.duckdb_path)
    with pytest.raises(SpecError, match=message):
        run(spec(make(tmp_path), **fields), tiny_model, store)
    assert snapshot(store.duckdb_path) == before


def test_bad_rows_are_rejected_with_file_row_and_field_and_nothing_stored_is_lost(tiny_model, store, tmp_path, snapshot):
    rows = pa.table(
        {
            "id": ["ok", "null", "empty", "utf8", "ok", "long", "ok2"],
            "prompt": pa.array([b"fine", None, b"  ", b"caf\xc3", b"again", b"x" * 4000, b"fine too"], pa.binary()),
        }
    )
    parquet(tmp_path / "rows.parquet", rows)
    lines = [
        json.dumps({"id": "j1", "prompt": "a json prompt"}).encode(),
        json.dumps({"id": "j2", "prompt": {"nested": "object"}}).encode(),
        b'{"id": "j3", "prompt": "unterminated',
        b'{"id": "j4", "prompt": "bad \xff byte"}',
    ]
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    before = snapshot(store.duckdb_path)

    tolerant = ValidationConfig(max_rejected_share=1.0)
    parquet_run = run(spec(tmp_path / "rows.parquet", validation=tolerant), tiny_model, store)
    jsonl_run = run(spec(tmp_path / "rows.jsonl", validation=tolerant), tiny_model, store)

    after = snapshot(store.duckdb_path)
    assert all(set(before[t]) <= set(after[t]) for t in TABLES)  # nothing already stored is lost or changed
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        rejected = con.execute(
            "SELECT dataset_version, source_file, source_row, custom_id, field, reason FROM rejected_rows "
            "WHERE dataset_version IN (?, ?) ORDER BY source_file DESC, source_row",
            [parquet_run.dataset_version, jsonl_run.dataset_version],
        ).fetchall()
    located = [(file.rsplit("/", 1)[1], row, custom_id, field) for _, file, row, custom_id, field, _ in rejected]
    assert located == [
        ("rows.parquet", 1, "null", "prompt"),
        ("rows.parquet", 2, "empty", "prompt"),
        ("rows.parquet", 3, "utf8", "prompt"),
        ("rows.parquet", 4, "ok", "id"),
        ("rows.parquet", 5, "long", "prompt"),
        ("rows.jsonl", 1, "j2", "prompt"),
        ("rows.jsonl", 2, None, "line"),
        ("rows.jsonl", 3, None, "line"),
    ]
    reasons = [reason for *_, reason in rejected]
    assert reasons[2] == "invalid UTF-8 at byte 3" and reasons[3] == "duplicate id 'ok'"
    assert reasons[4].startswith("prompt too long") and reasons[5] == "line 2: expected text, got an object"
    assert reasons[6].startswith("line 3: not valid JSON") and reasons[7] == "line 4: invalid UTF-8 at byte 28"
    assert (parquet_run.requests, parquet_run.rejected) == (2, 5) and (jsonl_run.requests, jsonl_run.rejected) == (1, 3)

    # the validation result is an artifact of the run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dataset-validation"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parquet_run.run_id])),
        )
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    budget = next(row for row in table if row["column"] == "approx_tokens")
    assert (budget["unexpected"], budget["success"]) == (1, False)
