"""Hostile rows and files through the real prepare pipeline: each bad row is a rejected row naming
file, row and field, the other rows are prepared; nothing crashes the run."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.config import DatasetSpec, ValidationConfig
from tasks.prepare.requests import prepare_requests, rejected_share_error


def prepare(spec: DatasetSpec, tmp_path, mode: str = "chat") -> tuple[list[dict], list[dict]]:
    """(requests, rejected rows) as prepare_requests writes them."""
    request_set = prepare_requests(spec, mode, str(tmp_path / "storage"), None)
    requests = [row for f in request_set.request_files for row in storage.read_parquet(f).to_pylist()]
    rejected = [row for f in request_set.rejected_files for row in storage.read_parquet(f).to_pylist()]
    return requests, rejected


def write_jsonl(path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_a_template_failing_on_a_row_rejects_that_row(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "title": [None, "ok", "x"], "n": [1, 2, 0]}), path)
    spec = DatasetSpec(name="t", source=str(path), id_column="id", prompt_template="{{ title + '!' }} {{ 10 // n }}")

    requests, rejected = prepare(spec, tmp_path)

    assert [(r["custom_id"], r["prompt"]) for r in requests] == [("b", "ok! 5")]
    assert [(r["source_file"], r["source_row"], r["custom_id"], r["field"]) for r in rejected] == [
        (str(path), 0, "a", "prompt_template"),
        (str(path), 2, "c", "prompt_template"),
    ]
    assert "TypeError" in rejected[0]["reason"] and "ZeroDivisionError" in rejected[1]["reason"]


def test_json_nested_too_deeply_is_a_rejected_row(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [{"id": "a", "prompt": "one"}, '{"id": "b", "prompt": ' + deep + "}", {"id": "c", "prompt": "three"}]
    path = write_jsonl(tmp_path / "rows.jsonl", lines)
    requests, rejected = prepare(DatasetSpec(name="t", source=path, id_column="id", prompt_column="prompt"), tmp_path)
    assert [r["custom_id"] for r in requests] == ["a", "c"]
    assert [(r["source_file"], r["source_row"], r["field"], r["reason"]) for r in rejected] == [
        (path, 1, "line", "line 2: JSON nested too deeply")
    ]

    # Chat messages stored as JSON text in Parquet: the same, for the messages column.
    parquet = tmp_path / "chats.parquet"
    good = json.dumps([{"role": "user", "content": "hi"}])
    pq.write_table(pa.table({"id": ["a", "b"], "turns": [good, deep]}), parquet)
    spec = DatasetSpec(name="chats", source=str(parquet), id_column="id", messages_column="turns")
    requests, rejected = prepare(spec, tmp_path / "second")
    assert [r["custom_id"] for r in requests] == ["a"]
    assert [(r["source_row"], r["custom_id"], r["field"], r["reason"]) for r in rejected] == [
        (1, "b", "turns", "messages are nested too deeply")
    ]


def test_ids_of_mixed_kinds_do_not_collapse_into_one(tmp_path):
    lines = [{"id": 1, "prompt": "one"}, {"id": "1", "prompt": "other"}, {"id": 2, "prompt": "two"}]
    path = write_jsonl(tmp_path / "rows.jsonl", lines)
    requests, rejected = prepare(DatasetSpec(name="t", source=path, id_column="id", prompt_column="prompt"), tmp_path)
    assert [(r["custom_id"], r["prompt"]) for r in requests] == [("1", "one"), ("2", "two")]
    assert [(r["source_row"], r["field"]) for r in rejected] == [(1, "id")]
    assert 'id "1" is text, but the dataset\'s ids are a number' in rejected[0]["reason"]
    assert f"{path} line 1" in rejected[0]["reason"]


def test_a_role_holding_a_comma_is_not_an_allowed_role(tmp_path):
    lines = [
        {"id": "a", "turns": [{"role": "user", "content": "hi"}]},
        {"id": "b", "turns": [{"role": "user,assistant", "content": "hi there"}]},
        {"id": "c", "turns": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]},
    ]
    path = write_jsonl(tmp_path / "chats.jsonl", lines)
    requests, rejected = prepare(DatasetSpec(name="t", source=path, id_column="id", messages_column="turns"), tmp_path)
    assert [r["custom_id"] for r in requests] == ["a", "c"]
    assert [(r["source_row"], r["custom_id"], r["field"]) for r in rejected] == [(1, "b", "messages")]
    assert "role not allowed" in rejected[0]["reason"]


def test_an_expectation_that_raises_lets_no_row_through(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["one", "two"], "lang": ["en", "de"]}), path)
    between = {"type": "expect_column_values_to_be_between", "kwargs": {"column": "lang", "min_value": 0}}
    spec = DatasetSpec(
        name="t", source=str(path), id_column="id", prompt_column="prompt", validation=ValidationConfig(expectations=[between])
    )
    request_set = prepare_requests(spec, "chat", str(tmp_path / "storage"), None)
    rejected = [row for f in request_set.rejected_files for row in storage.read_parquet(f).to_pylist()]

    assert request_set.requests == 0 and request_set.rejected == 2
    assert [(r["source_row"], r["custom_id"], r["field"]) for r in rejected] == [(0, "a", "lang"), (1, "b", "lang")]
    assert "expect_column_values_to_be_between could not be checked" in rejected[0]["reason"]
    assert "same type" in rejected[0]["reason"]  # GX's own message says why
    report = {row["column"]: row for row in request_set.validation}["lang"]
    assert report["success"] is False and "same type" in report["errors"]
    assert "2 of 2 rows rejected" in rejected_share_error(request_set, spec)


def test_parquet_columns_differing_only_in_case_are_read_by_their_exact_name(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table({"Prompt": ["WRONG", "WRONG"], "ID": ["x", "y"], "prompt": ["right", "also right"], "id": ["a", "b"]}), path
    )
    requests, rejected = prepare(DatasetSpec(name="t", source=str(path), id_column="id", prompt_column="prompt"), tmp_path)
    assert [(r["custom_id"], r["prompt"]) for r in requests] == [("a", "right"), ("b", "also right")] and rejected == []


def test_file_names_with_glob_characters_are_taken_literally(tmp_path):
    for name, prompt in [
        ("data[1].parquet", "literal"),
        ("data1.parquet", "glob match"),
        ("q?*.parquet", "odd name"),
        ("qa.parquet", "other"),
    ]:
        pq.write_table(pa.table({"id": ["a"], "prompt": [prompt]}), tmp_path / name)
    for name, prompt in [("data[1].parquet", "literal"), ("q?*.parquet", "odd name")]:
        spec = DatasetSpec(name="t", source=str(tmp_path / name), id_column="id", prompt_column="prompt")
        requests, _ = prepare(spec, tmp_path / f"run-{prompt}")
        assert [(r["source_file"], r["prompt"]) for r in requests] == [(str(tmp_path / name), prompt)]
    # A pattern that names no file is still a glob.
    spec = DatasetSpec(name="t", source=str(tmp_path / "data?.parquet"), id_column="id", prompt_column="prompt")
    assert [r["prompt"] for r in prepare(spec, tmp_path / "glob")[0]] == ["glob match"]


def test_symlinked_folders_are_read_and_a_link_cycle_ends(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "lang=en").mkdir(parents=True)
    (elsewhere / "deeper").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "prompt": ["local"]}), data / "lang=en" / "part-0.parquet")
    pq.write_table(pa.table({"id": ["b"], "prompt": ["linked"]}), elsewhere / "deeper" / "part-0.parquet")
    (data / "more").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(data, target_is_directory=True)  # a cycle: data/more/back is data
    spec = DatasetSpec(name="t", source=str(data), id_column="id", prompt_column="prompt")
    requests, rejected = prepare(spec, tmp_path)
    assert sorted((r["custom_id"], r["prompt"], r["source_file"]) for r in requests) == [
        ("a", "local", str(data / "lang=en" / "part-0.parquet")),
        ("b", "linked", str(data / "more" / "deeper" / "part-0.parquet")),
    ]
    assert rejected == []
