"""Every input format through load + render: Parquet trees and URLs, JSONL, OpenAI batch input."""

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import DatasetSpec, SpecError
from tasks.prepare.dataset import check_dataset, iter_batches
from tasks.prepare.render import Renderer


def spec(source, **fields) -> DatasetSpec:
    return DatasetSpec(**{"name": "t", "source": str(source), "id_column": "id", "prompt_column": "prompt", **fields})


def render_all(dataset: DatasetSpec, mode="chat"):
    checked = check_dataset(dataset)
    renderer = Renderer(checked.spec, mode)
    requests, rejected = [], []
    for batch in iter_batches(checked, batch_size=2):
        ok, bad = renderer.render(batch)
        requests += ok.to_pylist()
        rejected += bad.to_pylist()
    return checked, requests, rejected


def write_jsonl(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return path


def test_a_hive_partitioned_tree_reads_every_file_with_its_partition_columns(tmp_path):
    for lang, rows in {"en": [(1, "hello"), (2, "bye")], "fr": [(3, "salut")]}.items():
        (tmp_path / "tree" / f"lang={lang}").mkdir(parents=True)
        pq.write_table(
            pa.table({"id": [r[0] for r in rows], "prompt": [r[1] for r in rows]}),
            tmp_path / "tree" / f"lang={lang}" / "part-0.parquet",
        )
    dataset = spec(tmp_path / "tree", prompt_column=None, prompt_template="[{{ lang }}] {{ prompt }}")
    checked, requests, _ = render_all(dataset, "completion")
    assert checked.spec.format == "parquet"
    assert [(r["custom_id"], r["prompt"], r["source_row"]) for r in requests] == [
        ("1", "[en] hello", 0),
        ("2", "[en] bye", 1),
        ("3", "[fr] salut", 0),
    ]
    assert requests[2]["source_file"].endswith("lang=fr/part-0.parquet")


def test_fsspec_urls_read_like_local_paths(tmp_path):
    pq.write_table(pa.table({"id": [1], "prompt": ["from a file URL"]}), tmp_path / "x.parquet")
    _, requests, _ = render_all(spec(f"file://{tmp_path}/x.parquet"))
    assert requests[0]["custom_id"] == "1"

    memory = fsspec.filesystem("memory")
    for part, ids in enumerate((["m1", "m2"], ["m3"])):  # several files behind one URL
        with memory.open(f"/bucket/data/part-{part}.parquet", "wb") as handle:
            pq.write_table(pa.table({"id": ids, "prompt": [f"in memory {i}" for i in ids]}), handle)
    _, requests, _ = render_all(spec("memory://bucket/data/*.parquet"))
    assert [r["custom_id"] for r in requests] == ["m1", "m2", "m3"]
    assert [r["source_file"] for r in requests] == ["memory:///bucket/data/part-0.parquet"] * 2 + [
        "memory:///bucket/data/part-1.parquet"
    ]


def test_jsonl_with_messages_overrides_and_reference(tmp_path):
    path = write_jsonl(
        tmp_path / "chats.jsonl",
        [
            {"id": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "answer": "hello"},
            {"id": "b", "messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]},
        ],
    )
    dataset = DatasetSpec(
        name="t",
        source=str(path),
        id_column="id",
        messages_column="messages",
        override_columns=["max_tokens"],
        reference_column="answer",
        system_prompt="Be kind.",
    )
    checked, requests, rejected = render_all(dataset)
    assert checked.spec.format == "jsonl" and rejected == []
    first, second = requests
    assert json.loads(first["messages"]) == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]
    assert json.loads(first["overrides"]) == {"max_tokens": 5} and first["reference"] == "hello"
    assert json.loads(second["messages"])[0] == {"role": "system", "content": "terse"}  # its own system message wins
    assert second["overrides"] is None
    # the override is part of what is sent, so it is part of the key
    assert first["request_key"] != render_all(dataset.model_copy(update={"override_columns": []}))[1][0]["request_key"]


def test_openai_batch_input_maps_chat_and_completion_lines_and_rejects_other_urls(tmp_path):
    path = write_jsonl(
        tmp_path / "batch.jsonl",
        [
            {
                "custom_id": "c1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "x",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_completion_tokens": 7,
                    "temperature": 0.5,
                },
            },
            {"custom_id": "c2", "method": "POST", "url": "/v1/completions", "body": {"model": "x", "prompt": "Once"}},
            {"custom_id": "c3", "method": "POST", "url": "/v1/embeddings", "body": {"model": "x", "input": "no"}},
            b"{not json",
            {"method": "POST", "url": "/v1/completions", "body": {"prompt": "no id"}},
        ],
    )
    checked, requests, rejected = render_all(DatasetSpec(name="t", source=str(path)))
    assert checked.spec.format == "openai_batch"
    assert [r["custom_id"] for r in requests] == ["c1", "c2"]
    assert json.loads(requests[0]["overrides"]) == {"max_tokens": 7, "temperature": 0.5}
    assert (requests[1]["prompt"], requests[1]["messages"]) == ("Once", None)  # a completions line: the prompt as it is
    assert [(r["source_row"], r["custom_id"], r["field"]) for r in rejected] == [
        (2, "c3", "url"),
        (3, None, "line"),
        (4, None, "custom_id"),
    ]
    assert "line 3: url '/v1/embeddings' is not supported" in rejected[0]["reason"]
    assert rejected[1]["reason"].startswith("line 4: not valid JSON")
    assert all(r["source_file"] == str(path) for r in rejected)


def test_the_format_can_be_set_in_the_spec(tmp_path):
    path = write_jsonl(tmp_path / "rows.txt", [{"id": 1, "prompt": "plain"}])
    with pytest.raises(SpecError, match="not a readable Parquet file"):
        check_dataset(spec(path))
    _, requests, _ = render_all(spec(path, format="jsonl"))
    assert requests[0]["prompt"] == "plain"


def test_ids_derived_from_content_are_stable_and_never_collide(tmp_path):
    pq.write_table(pa.table({"prompt": ["same", "other", "same"]}), tmp_path / "x.parquet")
    _, requests, _ = render_all(spec(tmp_path / "x.parquet", id_column=None))
    ids = [r["custom_id"] for r in requests]
    assert ids[0] == ids[2] != ids[1] and ids[0].startswith("row-")
    assert ids == [r["custom_id"] for r in render_all(spec(tmp_path / "x.parquet", id_column=None))[1]]


def test_jsonl_columns_named_by_expectations_keep_their_json_types(tmp_path):
    from tasks.config import ValidationConfig

    source = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"id": 1, "prompt": "a", "score": 3, "tags": "x"},
            {"id": 2, "prompt": "b", "score": 7, "tags": ["y"]},
        ],
    )
    validation = ValidationConfig(
        expectations=[
            {"type": "expect_column_values_to_be_between", "kwargs": {"column": "score", "max_value": 5}},
            {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "tags"}},
        ]
    )
    checked = check_dataset(spec(source, validation=validation))
    renderer = Renderer(checked.spec, "chat")
    requests, _ = renderer.render(next(iter_batches(checked)))
    assert requests["score"].to_pylist() == [3, 7]  # a number, not JSON text
    assert requests["tags"].to_pylist() == ["x", '["y"]']  # mixed types in one field: JSON text


def test_a_template_column_an_expectation_names_reaches_the_validator_too(tmp_path):
    from tasks.config import ValidationConfig

    pq.write_table(pa.table({"id": [1, 2], "topic": ["cats", ""]}), tmp_path / "t.parquet")
    validation = ValidationConfig(
        expectations=[
            {"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "topic", "min_value": 1}},
        ]
    )
    dataset = spec(tmp_path / "t.parquet", prompt_column=None, prompt_template="About {{ topic }}.", validation=validation)
    checked = check_dataset(dataset)
    requests, _ = Renderer(checked.spec, "chat").render(next(iter_batches(checked)))
    assert requests["topic"].to_pylist() == ["cats", ""] and requests["prompt"].to_pylist() == ["About cats.", "About ."]


def test_invalid_utf8_in_a_text_typed_column_is_a_clear_error_naming_the_file(tmp_path):
    # Binary columns get a rejected row per bad value (tests/flows/test_bad_input.py); a column typed
    # as text that holds invalid bytes cannot be read as text at all.
    prompts = pa.array([b"fine", b"caf\xc3", b"ok"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": prompts}), tmp_path / "bad.parquet")
    with pytest.raises(SpecError, match=r"bad\.parquet: a text column holds invalid UTF-8 after row 0 .*caf"):
        render_all(spec(tmp_path / "bad.parquet"))
