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
