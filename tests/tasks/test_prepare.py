import pyarrow as pa

from tasks.prepare import DatasetVersioner
from tasks.render import REJECTED_SCHEMA, REQUEST_SCHEMA


def version(references: list) -> str:
    requests = pa.Table.from_pylist(
        [{"custom_id": str(i), "request_key": f"k{i}", "prompt": "p", "messages": None, "source_file": "f",
          "source_row": i, "reference": reference} for i, reference in enumerate(references)],
        schema=REQUEST_SCHEMA,
    )  # fmt: skip
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

    from tasks import prepare
    from tasks.config import DatasetSpec

    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["one", "two", "one"]}), source)
    spec = DatasetSpec(name="t", source=str(source), id_column="id", prompt_column="prompt")
    storage = str(tmp_path / "storage")
    first = prepare.write_requests.fn(spec, "chat", storage, 1024)
    assert first.unique_requests == 2 and first.input_fingerprint

    def no_reading(_spec):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(prepare, "check_dataset", no_reading)
    assert prepare.write_requests.fn(spec, "chat", storage, 1024) == first  # from its parts, source untouched
    with pytest.raises(AssertionError, match="read again"):  # another context budget is another preparation
        prepare.write_requests.fn(spec, "chat", storage, 512)
    monkeypatch.undo()

    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "prompt": ["one", "two", "one", "four"]}), source)
    os.utime(source, ns=(1, 1))  # even with an old mtime: size and change time tell it apart
    again = prepare.write_requests.fn(spec, "chat", storage, 1024)
    assert again.input_fingerprint != first.input_fingerprint and again.unique_requests == 3
