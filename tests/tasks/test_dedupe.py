import pyarrow as pa

from tasks.dedupe import ExactDeduper


def requests(rows: list[tuple[str, str]], first_row: int = 0) -> pa.Table:
    return pa.table(
        {
            "custom_id": [custom_id for custom_id, _ in rows],
            "request_key": [key for _, key in rows],
            "source_file": ["f.parquet"] * len(rows),
            "source_row": list(range(first_row, first_row + len(rows))),
        }
    )


def test_duplicates_point_at_the_first_request_with_the_same_content_across_batches():
    deduper = ExactDeduper()
    first, _ = deduper.mark(requests([("a", "k1"), ("b", "k2"), ("c", "k1")]))
    second, _ = deduper.mark(requests([("d", "k2"), ("e", "k3")], first_row=3))
    assert first["duplicate_of"].to_pylist() == [None, None, "a"]
    assert second["duplicate_of"].to_pylist() == ["b", None]


def test_a_repeated_id_is_rejected_with_its_row():
    deduper = ExactDeduper(id_field="id")
    marked, rejected = deduper.mark(requests([("a", "k1"), ("a", "k2")]))
    assert marked["custom_id"].to_pylist() == ["a"]
    assert rejected.to_pylist() == [
        {"source_file": "f.parquet", "source_row": 1, "custom_id": "a", "field": "id", "reason": "duplicate id 'a'"}
    ]
