import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.batch_inference import batch_inference
from tasks.config import DatasetSpec, DedupeConfig, SamplingConfig, ShardingConfig, SpecError, ValidationConfig
from tasks.engines import vllm as engine_module

pytestmark = pytest.mark.slow

TABLES = ["dataset_versions", "requests", "rejected_rows", "runs", "run_shards", "outputs", "scores", "schema_migrations"]


@pytest.fixture
def sample_slice(sample_spec) -> DatasetSpec:
    """The first 400 rows of the bundled sample: duplicates, null and empty prompts included."""
    return sample_spec(400, system_prompt="Be brief.")


def run(dataset, model, store):
    return batch_inference(
        dataset=dataset,
        model=model,
        sampling=SamplingConfig(max_tokens=8),
        sharding=ShardingConfig(shard_size=64),
        store=store,
    )


def test_flow_writes_one_output_per_unique_request_and_a_rerun_is_fully_cached(
    prefect_harness, tiny_model, sample_slice, store, query, snapshot
):
    source = pq.read_table(sample_slice.source).to_pylist()
    blank = sum(1 for row in source if not (row["prompt"] or "").strip())
    # duplicates are requests the engine would receive identically (the default match: exact)
    distinct = len({row["prompt"] for row in source if (row["prompt"] or "").strip()})

    first = run(sample_slice, tiny_model, store)

    assert (first.rows_read, first.rejected, first.requests) == (400, blank, 400 - blank)
    assert first.unique_requests == distinct and first.duplicates == first.requests - distinct > 0
    assert first.shards == -(-distinct // 64) and first.cached_shards == 0
    assert first.engine_requests == distinct == first.outputs and first.errors == 0
    # one output per unique request, each tied to its canonical custom_id
    assert query(store, "SELECT count(*), count(DISTINCT request_key) FROM outputs") == [(distinct, distinct)]
    assert query(
        store,
        "SELECT count(*) FROM outputs o JOIN requests q USING (request_key, custom_id) WHERE q.duplicate_of IS NULL",
    ) == [(distinct,)]
    # every duplicate points at a canonical request, and gets its answer
    assert query(
        store,
        """SELECT count(*) FROM requests d JOIN requests c
           ON c.dataset_version = d.dataset_version AND c.custom_id = d.duplicate_of
           WHERE c.duplicate_of IS NULL""",
    ) == [(first.duplicates,)]
    assert query(store, "SELECT count(*), count(text) FROM run_outputs") == [(first.requests, first.requests)]
    assert query(store, "SELECT count(*) FROM rejected_rows WHERE field = 'prompt'") == [(blank,)]
    # counts on the run row match the rows
    (run_row,) = query(store, "SELECT outputs, errors, unique_requests, duplicates, shards, completion_tokens FROM runs")
    assert run_row == (
        query(store, "SELECT count(*) FROM run_outputs WHERE duplicate_of IS NULL")[0][0],
        0,
        query(store, "SELECT count(*) FROM requests WHERE duplicate_of IS NULL")[0][0],
        query(store, "SELECT count(*) FROM requests WHERE duplicate_of IS NOT NULL")[0][0],
        query(store, "SELECT count(*) FROM run_shards")[0][0],
        query(store, "SELECT sum(completion_tokens) FROM outputs")[0][0],
    )
    # scorers that always apply score every output; reference and logprob scorers have nothing here
    assert query(store, "SELECT scorer, count(*) FROM scores WHERE scorer <> 'distinct_2' GROUP BY 1 ORDER BY 1") == [
        (name, distinct)
        for name in sorted(["completion_chars", "completion_tokens", "empty_output", "finish_reason", "refusal", "valid_json"])
    ]
    # where the time went: each shard's scoring and commit add up, within the inference stage
    stages = json.loads(query(store, "SELECT stage_seconds FROM runs")[0][0])
    assert 0 < stages["score"] + stages["commit_shards"] < stages["infer"]
    assert (stages["score"], stages["commit_shards"]) == (first.stage_seconds["score"], first.stage_seconds["commit_shards"])

    before = snapshot(store.duckdb_path)
    sent_before = engine_module.get_engine(tiny_model).requests_sent
    second = run(sample_slice, tiny_model, store)

    # every request already has its output in DuckDB: nothing is sharded or sent
    assert (second.shards, second.engine_requests, second.reused_requests) == (0, 0, distinct)
    assert engine_module.get_engine(tiny_model).requests_sent == sent_before  # the engine saw nothing
    assert second.dataset_version == first.dataset_version
    after = snapshot(store.duckdb_path)
    assert {t for t in TABLES if after[t] != before[t]} == {"runs"}  # only its own run
    assert len(after["runs"]) == 2
    assert query(store, "SELECT count(text) FROM run_outputs WHERE run_id = ?", [second.run_id]) == [(first.requests,)]

    # a new results file on the same storage: every shard comes from Prefect's cache
    elsewhere = store.model_copy(update={"duckdb_path": str(Path(store.duckdb_path).with_name("other.duckdb"))})
    third = run(sample_slice, tiny_model, elsewhere)
    assert third.cached_shards == third.shards == first.shards and third.engine_requests == 0
    assert engine_module.get_engine(tiny_model).requests_sent == sent_before
    assert third.outputs == first.outputs


def test_bad_spec_fails_naming_file_and_column_before_anything_is_written(
    prefect_harness, tiny_model, tmp_path, store, sample_parquet
):
    missing_file = DatasetSpec(name="x", source=str(tmp_path / "nope.parquet"), id_column="id", prompt_column="prompt")
    with pytest.raises(SpecError, match=r"nope\.parquet: no such file"):
        run(missing_file, tiny_model, store)
    assert not Path(store.duckdb_path).exists()

    path = tmp_path / "data.parquet"
    pq.write_table(pq.read_table(sample_parquet).slice(0, 10), path)
    wrong_column = DatasetSpec(name="x", source=str(path), id_column="id", prompt_column="question")
    with pytest.raises(SpecError, match=r"data\.parquet has no column 'question'"):
        run(wrong_column, tiny_model, store)
    assert not Path(store.duckdb_path).exists()
    assert not list(Path(store.storage).rglob("*.parquet"))


def test_n_samples_with_logprobs_land_as_one_row_per_sample(prefect_harness, tiny_model, sample_slice, store, query):
    summary = batch_inference(
        dataset=sample_slice,
        model=tiny_model,
        # logprobs=0 with n > 1 and a seed crashes vLLM's CPU worker ("CPU Generator does not use offset")
        sampling=SamplingConfig(max_tokens=4, n=2, temperature=0.8, seed=5, logprobs=1),
        sharding=ShardingConfig(shard_size=200),
        store=store,
    )
    assert summary.outputs == 2 * summary.unique_requests
    rows = query(
        store,
        """SELECT count(*), count(DISTINCT request_key), min(sample_index), max(sample_index),
                  count(mean_logprob), max(mean_logprob), count(latency_seconds)
           FROM outputs""",
    )
    unique = summary.unique_requests
    assert rows[0][:4] == (2 * unique, unique, 0, 1)
    assert rows[0][4] == 2 * unique and rows[0][5] < 0 and rows[0][6] == 2 * unique
    # duplicates see both samples of their canonical request
    assert query(store, "SELECT count(*) FROM run_outputs")[0][0] == 2 * summary.requests


def test_appending_one_percent_of_rows_sends_only_the_new_requests(
    prefect_harness, tiny_model, tmp_path, store, query, sample_parquet
):
    rows = pq.read_table(sample_parquet).slice(0, 400)
    base = tmp_path / "grow" / "part-0.parquet"
    base.parent.mkdir()
    pq.write_table(rows.select(["id", "prompt"]), base)
    dataset = DatasetSpec(name="grow", source=str(base.parent), id_column="id", prompt_column="prompt")
    first = run(dataset, tiny_model, store)

    appended = pa.table({"id": [f"new-{i}" for i in range(4)], "prompt": [f"A brand new question number {i}?" for i in range(4)]})
    pq.write_table(appended.cast(rows.select(["id", "prompt"]).schema), base.parent / "part-1.parquet")
    sent_before = engine_module.get_engine(tiny_model).requests_sent
    second = run(dataset, tiny_model, store)

    assert engine_module.get_engine(tiny_model).requests_sent - sent_before == 4  # only the 1% appended
    assert (second.engine_requests, second.reused_requests) == (4, first.unique_requests)
    assert second.unique_requests == first.unique_requests + 4
    assert query(store, "SELECT count(text) FROM run_outputs WHERE run_id = ?", [second.run_id]) == [(second.requests,)]


def test_near_duplicates_are_computed_once_and_answered_through_duplicate_of(prefect_harness, tiny_model, tmp_path, store, query):
    words = [f"word{i}" for i in range(60)]
    source = " ".join(words[:40])
    rows = {
        "a": source,
        "b": " ".join(words[:17] + ["CHANGED"] + words[18:40]),  # a near-duplicate of a
        "c": "  " + source.upper().replace(" ", "\n", 2),  # an exact duplicate of a after normalization and case
        "d": " ".join(words[20:60]),  # unrelated
    }
    path = tmp_path / "near.parquet"
    pq.write_table(pa.table({"id": list(rows), "prompt": list(rows.values())}), path)
    dataset = DatasetSpec(
        name="near",
        source=str(path),
        id_column="id",
        prompt_column="prompt",
        dedupe=DedupeConfig(match="normalized", near_duplicates=True, case_fold=True),
    )
    sent_before = engine_module.get_engine(tiny_model).requests_sent
    summary = run(dataset, tiny_model, store)

    assert (summary.requests, summary.unique_requests, summary.duplicates) == (4, 2, 2)
    assert engine_module.get_engine(tiny_model).requests_sent - sent_before == 2
    assert query(store, "SELECT custom_id, duplicate_of FROM requests ORDER BY custom_id") == [
        ("a", None),
        ("b", "a"),
        ("c", "a"),
        ("d", None),
    ]
    answers = dict(query(store, "SELECT custom_id, output_id FROM run_outputs"))
    assert len(answers) == 4 and answers["b"] == answers["c"] == answers["a"] != answers["d"]


def test_openai_batch_lines_run_with_their_own_sampling_overrides(prefect_harness, tiny_model, tmp_path, store, query):
    lines = [
        {
            "custom_id": "short",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "any", "messages": [{"role": "user", "content": "Tell me a story"}], "max_completion_tokens": 2},
        },
        {
            "custom_id": "default",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "any", "prompt": "Tell me a story"},
        },
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"model": "any", "input": "no"}},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dataset = DatasetSpec(name="openai", source=str(path), validation=ValidationConfig(max_rejected_share=0.5))
    summary = run(dataset, tiny_model, store)

    assert (summary.requests, summary.rejected) == (2, 1)
    assert query(store, "SELECT custom_id, overrides FROM requests ORDER BY custom_id") == [
        ("default", None),
        ("short", '{"max_tokens": 2}'),
    ]
    tokens = dict(query(store, "SELECT custom_id, completion_tokens FROM run_outputs"))
    assert tokens["short"] <= 2 < tokens["default"]  # the run's max_tokens is 8, and random weights rarely stop early
    assert query(store, "SELECT field, source_row FROM rejected_rows") == [("url", 2)]


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


def test_openai_batch_response_format_and_logit_bias_reach_the_engine(prefect_harness, tiny_model, tmp_path, store, query):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model.model)
    (letter,) = tokenizer.encode("s", add_special_tokens=False)
    # Random weights would pad a JSON answer with blanks until max_tokens (vLLM 0.32 sets
    # disable_any_whitespace only for a whole engine): the schema lines bias blank tokens away, as a user may.
    blanks = {str(i): -100 for i in range(len(tokenizer)) if any(c.isspace() for c in tokenizer.decode([i]))}
    story = [{"role": "user", "content": "Tell me a story"}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": ANSWER_SCHEMA}}
    bodies = {
        "schema-text": {"messages": [{"role": "user", "content": "Is water wet?"}]},
        "schema-parts": {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Is fire"}, {"type": "text", "text": "cold?"}]}]
        },
    }
    lines = [
        {
            "custom_id": custom_id,
            "url": "/v1/chat/completions",
            "body": {**body, "response_format": schema_format, "logit_bias": blanks, "max_completion_tokens": 48},
        }
        for custom_id, body in bodies.items()
    ]
    lines += [
        {
            "custom_id": "biased",
            "url": "/v1/chat/completions",
            "body": {"messages": story, "logit_bias": {str(letter): 100}, "seed": 7, "max_tokens": 5},
        },
        {"custom_id": "plain", "url": "/v1/chat/completions", "body": {"messages": story, "max_tokens": 5}},
        {
            "custom_id": "tagged",
            "url": "/v1/chat/completions",
            "body": {"messages": story, "max_tokens": 5, "user": "u-1", "metadata": {"team": "x"}},
        },
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run(DatasetSpec(name="openai-lines", source=str(path)), tiny_model, store)

    assert (summary.requests, summary.rejected, summary.errors) == (5, 0, 0)
    texts = dict(query(store, "SELECT custom_id, text FROM run_outputs"))
    for custom_id in bodies:  # every json_schema answer is JSON that its schema accepts
        jsonschema.validate(json.loads(texts[custom_id]), ANSWER_SCHEMA)
    # The line's logit_bias reached the engine: every token is the favoured one.
    assert texts["biased"] == "s" * 5 != texts["plain"]
    requests = {row[0]: row[1:] for row in query(store, "SELECT custom_id, request_key, overrides, duplicate_of FROM requests")}
    assert json.loads(requests["biased"][1]) == {"logit_bias": {str(letter): 100.0}, "max_tokens": 5, "seed": 7}
    assert requests["biased"][0] != requests["plain"][0]  # the overrides are part of the request's identity
    # user and metadata are not: the tagged line is the plain one, answered once
    assert requests["tagged"][0] == requests["plain"][0] and requests["tagged"][2] == "plain"
    assert texts["tagged"] == texts["plain"]
