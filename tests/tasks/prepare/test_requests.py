import pyarrow as pa

from tasks.keys import DatasetVersioner
from tasks.prepare.render import REQUEST_SCHEMA
from tasks.prepare.sources import REJECTED_SCHEMA


def version(references: list) -> str:
    requests = pa.Table.from_pylist(
        [
            {
                "custom_id": str(i),
                "request_key": f"k{i}",
                "prompt": "p",
                "messages": None,
                "source_file": "f",
                "source_row": i,
                "reference": reference,
            }
            for i, reference in enumerate(references)
        ],
        schema=REQUEST_SCHEMA,
    )
    versioner = DatasetVersioner()
    versioner.add(requests, REJECTED_SCHEMA.empty_table())
    return versioner.version()


def test_references_are_part_of_the_dataset_version():
    assert version(["a", "b"]) != version(["a", "c"]) != version([None, None])
    assert version([None, None]) == version([None, None])


def test_an_unchanged_input_is_prepared_once_and_a_changed_file_again(tmp_path, monkeypatch):
    import os

    import pyarrow.parquet as pq
    import pytest

    from tasks.config import DatasetSpec
    from tasks.prepare import requests

    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["one", "two", "one"]}), source)
    spec = DatasetSpec(name="t", source=str(source), id_column="id", prompt_column="prompt")
    storage = str(tmp_path / "storage")
    first = requests.prepare_requests(spec, "chat", storage, 1024)
    assert first.unique_requests == 2 and first.input_fingerprint

    def no_reading(_spec):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(requests, "check_dataset", no_reading)
    assert requests.prepare_requests(spec, "chat", storage, 1024) == first  # from its parts, source untouched
    with pytest.raises(AssertionError, match="read again"):  # another context budget is another preparation
        requests.prepare_requests(spec, "chat", storage, 512)
    monkeypatch.undo()

    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "prompt": ["one", "two", "one", "four"]}), source)
    os.utime(source, ns=(1, 1))  # even with an old mtime: size and change time tell it apart
    again = requests.prepare_requests(spec, "chat", storage, 1024)
    assert again.input_fingerprint != first.input_fingerprint and again.unique_requests == 3


def test_expectations_can_name_the_datasets_own_columns(tmp_path):
    """A column that is not a request column is read from the dataset, in its own type, for validation only."""
    import pyarrow.parquet as pq

    from tasks import storage
    from tasks.config import DatasetSpec, ValidationConfig
    from tasks.prepare import requests

    source = tmp_path / "prompts.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b", "c", "d"],
                "prompt": ["one", "two", "three", "four"],
                "lang": ["en", "de", "xx", "en"],
                "quality": [0.9, 0.2, 0.8, 0.7],
            }
        ),
        source,
    )
    validation = ValidationConfig(
        expectations=[
            {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "lang", "value_set": ["en", "de"]}},
            {"type": "expect_column_values_to_be_between", "kwargs": {"column": "quality", "min_value": 0.5}},
            {"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "prompt", "max_value": 4}},
        ]
    )
    spec = DatasetSpec(name="t", source=str(source), id_column="id", prompt_column="prompt", validation=validation)
    request_set = requests.prepare_requests(spec, "chat", str(tmp_path / "storage"), 1024)

    rejected = pa.concat_tables([storage.read_parquet(f) for f in request_set.rejected_files]).to_pylist()
    # c fails lang and the prompt length: its rejected row names the first failed expectation
    assert sorted((r["custom_id"], r["field"], r["source_row"]) for r in rejected) == [("b", "quality", 1), ("c", "lang", 2)]
    stored = pa.concat_tables([storage.read_parquet(f) for f in request_set.request_files])
    assert stored["custom_id"].to_pylist() == ["a", "d"]
    assert "lang" not in stored.column_names and "quality" not in stored.column_names  # not part of the requests
    assert {row["column"]: row["unexpected"] for row in request_set.validation if row["column"] in ("lang", "quality")} == {
        "lang": 1,
        "quality": 1,
    }


def test_a_column_an_expectation_names_must_exist(tmp_path):
    import pyarrow.parquet as pq
    import pytest

    from tasks.config import DatasetSpec, SpecError, ValidationConfig
    from tasks.prepare import requests

    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["one"]}), source)
    validation = ValidationConfig(expectations=[{"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "lang"}}])
    spec = DatasetSpec(name="t", source=str(source), id_column="id", prompt_column="prompt", validation=validation)
    with pytest.raises(SpecError, match=r"prompts.parquet has no column 'lang' \(columns: id, prompt\)"):
        requests.prepare_requests(spec, "chat", str(tmp_path / "storage"), 1024)
