"""Requests share an answer (duplicate_of, then fan-out) only when the engine would receive the same
request; the looser normalized match merges what the docs say and never one chat message with two."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.config import DatasetSpec, DedupeConfig
from tasks.prepare.requests import prepare_requests

# Pairs that NFKC or whitespace folding makes equal, though the model sees different prompts.
LOOKALIKES = [
    ("x²", "x2"),
    ("½ cup", "1⁄2 cup"),
    ("5 ㎏", "5 kg"),
    ("def f():\n    if x:\n        return 1", "def f():\n  if x:\n    return 1"),
]


def duplicate_of(spec: DatasetSpec, tmp_path) -> dict[str, str | None]:
    request_set = prepare_requests(spec, "chat", str(tmp_path / "storage"), None)
    rows = [row for f in request_set.request_files for row in storage.read_parquet(f).to_pylist()]
    return {row["custom_id"]: row["duplicate_of"] for row in rows}


def lookalikes_dataset(tmp_path, **fields) -> DatasetSpec:
    prompts = [text for pair in LOOKALIKES for text in pair] + ["same", "same"]
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(prompts))], "prompt": prompts}), path)
    return DatasetSpec(name="t", source=str(path), id_column="id", prompt_column="prompt", **fields)


def test_by_default_only_identical_requests_share_an_answer(tmp_path):
    marked = duplicate_of(lookalikes_dataset(tmp_path), tmp_path)
    assert marked == {**{f"r{i}": None for i in range(9)}, "r9": "r8"}


def test_the_normalized_match_merges_lookalikes_when_asked(tmp_path):
    marked = duplicate_of(lookalikes_dataset(tmp_path, dedupe=DedupeConfig(match="normalized")), tmp_path)
    assert marked == {"r0": None, "r1": "r0", "r2": None, "r3": "r2", "r4": None, "r5": "r4", "r6": None, "r7": "r6"} | {
        "r8": None,
        "r9": "r8",
    }


def test_one_chat_message_never_equals_two(tmp_path):
    two = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    # One message whose text spells the old flattening of the two above (DEL between role and content,
    # two DELs between messages) and, under normalization, the same with other spacing.
    one = [{"role": "system", "content": "a \x7f\x7fuser\x7f b"}]
    spaced = [{"role": "system", "content": "a  \x7f;user\x7f: b"}]
    lines = [{"id": "two", "turns": two}, {"id": "one", "turns": one}, {"id": "spaced", "turns": spaced}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for match in ("exact", "normalized"):
        spec = DatasetSpec(name="t", source=str(path), id_column="id", messages_column="turns", dedupe=DedupeConfig(match=match))
        assert duplicate_of(spec, tmp_path / match) == {"two": None, "one": None, "spaced": None}, match
