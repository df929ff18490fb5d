"""Curated datasets: reviewed samples as conversations, versioned by their content."""

from __future__ import annotations

import json

import pyarrow as pa

from tasks.keys import CURATED_FORMAT, curated_version
from tasks.prepare.render import conversation


def curated_record(row: dict) -> dict:
    """One curated example: the conversation with the reviewed answer last."""
    corrected = bool((row["corrected_text"] or "").strip())
    messages = conversation(row["prompt"], row["messages"])
    return {
        "run_id": row["run_id"],
        "custom_id": row["custom_id"],
        "output_id": row["output_id"],
        "source": "corrected" if corrected else "accepted",
        "rating": row["rating"],
        "messages": [*messages, {"role": "assistant", "content": row["corrected_text"] if corrected else row["model_response"]}],
    }


def jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False, sort_keys=True).encode() + b"\n" for r in records)


def version_manifest(name: str, records: list[dict]) -> dict:
    """Same records → same content hash → same version, whenever and wherever it is built."""
    version, content_hash = curated_version(name, records)
    source_runs = sorted({r["run_id"] for r in records})
    return {
        "name": name,
        "curated_version": version,
        "format": CURATED_FORMAT,
        "content_hash": content_hash,
        "source_runs": source_runs,
        "counts": {
            "examples": len(records),
            "accepted": sum(r["source"] == "accepted" for r in records),
            "corrected": sum(r["source"] == "corrected" for r in records),
        },
        "files": {"parquet": "curated.parquet", "jsonl": "curated.jsonl"},
    }


def records_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{**r, "messages": json.dumps(r["messages"], ensure_ascii=False)} for r in records],
        schema=pa.schema(
            [
                ("run_id", pa.string()),
                ("custom_id", pa.string()),
                ("output_id", pa.string()),
                ("source", pa.string()),
                ("rating", pa.int32()),
                ("messages", pa.string()),  # JSON list of {role, content}, the reviewed answer last
            ]
        ),
    )
