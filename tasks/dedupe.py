"""Exact dedupe: requests with the same content share one canonical request (and one output)."""

from __future__ import annotations

import pyarrow as pa

from tasks.render import REJECTED_SCHEMA


class ExactDeduper:
    """Marks each request with `duplicate_of` (the canonical custom_id, null for canonical ones).

    Stateful across batches so a dataset streams through in bounded batches; the first request
    seen with a given content is the canonical one. A repeated custom_id is rejected, since
    results join back to inputs by it.
    """

    def __init__(self, id_field: str = "id"):
        self.id_field = id_field
        self.canonical_by_key: dict[str, str] = {}
        self.seen_ids: set[str] = set()

    def mark(self, requests: pa.Table) -> tuple[pa.Table, pa.Table]:
        keep: list[bool] = []
        duplicate_of: list[str | None] = []
        rejected: list[dict] = []
        for custom_id, request_key, source_file, source_row in zip(
            requests["custom_id"].to_pylist(),
            requests["request_key"].to_pylist(),
            requests["source_file"].to_pylist(),
            requests["source_row"].to_pylist(),
        ):
            if custom_id in self.seen_ids:
                keep.append(False)
                rejected.append(
                    {
                        "source_file": source_file,
                        "source_row": source_row,
                        "custom_id": custom_id,
                        "field": self.id_field,
                        "reason": f"duplicate id '{custom_id}'",
                    }
                )
                continue
            self.seen_ids.add(custom_id)
            keep.append(True)
            canonical = self.canonical_by_key.setdefault(request_key, custom_id)
            if canonical != custom_id:
                duplicate_of.append(canonical)
            else:
                duplicate_of.append(None)
        kept = requests.filter(pa.array(keep, type=pa.bool_()))
        marked = kept.append_column("duplicate_of", pa.array(duplicate_of, type=pa.string()))
        return marked, pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA)
