"""The in-process vLLM engine on the tiny model: real vLLM (CPU build), one engine for the session."""

import json

import pyarrow as pa
import pytest

from tasks.config import LoraAdapter, SamplingConfig, SpecError, StructuredOutput
from tasks.engines.vllm import get_engine
from tasks.keys import content_hash
from tasks.prepare.render import request_content


def shard(prompts: list[str], overrides: list[dict | None] | None = None) -> pa.Table:
    contents = [request_content(p, "Be brief.", "chat") for p in prompts]
    columns = {
        "request_key": [content_hash([c, i]) for i, c in enumerate(contents)],
        "prompt": prompts,
        "messages": [json.dumps(c["messages"]) for c in contents],
    }
    if overrides is not None:
        columns["overrides"] = [json.dumps(o) if o else None for o in overrides]
    return pa.table(columns)


@pytest.mark.slow
def test_real_vllm_generates_per_request_and_turns_a_too_long_prompt_into_an_error_row(tiny_model):
    engine = get_engine(tiny_model)
    assert get_engine(tiny_model) is engine  # one engine per process and config
    prompts = ["Write a haiku about the sea.", "word " * 400, "List three colors."]
    sampling = SamplingConfig(max_tokens=12)
    outputs = engine.generate(shard(prompts), sampling).to_pylist()

    ok = [o for o in outputs if o["error_code"] is None]
    errors = [o for o in outputs if o["error_code"] is not None]
    assert len(ok) == 2 and len(errors) == 1
    assert errors[0]["error_code"] == "context_length_exceeded"
    assert "the model's context is 256" in errors[0]["error"]
    for output in ok:
        assert 1 <= output["completion_tokens"] <= 12
        assert output["finish_reason"] in {"stop", "length"}
        assert output["prompt_tokens"] > 5
        assert output["latency_seconds"] > 0
        assert output["mean_logprob"] is None  # not asked for

    again = engine.generate(shard(prompts), sampling).to_pylist()
    assert [o["text"] for o in again] == [o["text"] for o in outputs]  # greedy is deterministic


@pytest.mark.slow
def test_n_samples_logprobs_and_seeded_sampling(tiny_model):
    engine = get_engine(tiny_model)
    sampling = SamplingConfig(
        n=3,
        temperature=1.0,
        top_k=50,
        min_p=0.01,
        seed=7,
        logprobs=1,
        max_tokens=6,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
    )
    outputs = engine.generate(shard(["Tell me a story.", "Name a fruit."]), sampling).to_pylist()
    assert sorted((o["request_key"], o["sample_index"]) for o in outputs) == sorted(
        (key, i) for key in {o["request_key"] for o in outputs} for i in range(3)
    )
    assert all(o["mean_logprob"] is not None and o["mean_logprob"] < 0 for o in outputs)
    again = engine.generate(shard(["Tell me a story.", "Name a fruit."]), sampling).to_pylist()
    assert [o["text"] for o in again] == [o["text"] for o in outputs]  # per-request seed reproduces


@pytest.mark.slow
def test_structured_output_and_per_row_overrides_with_bad_rows_as_error_rows(tiny_model):
    engine = get_engine(tiny_model)
    choice = SamplingConfig(max_tokens=8, structured=StructuredOutput(choice=["yes", "no"]))
    texts = [o["text"] for o in engine.generate(shard(["Is water wet?", "Is fire cold?"]), choice).to_pylist()]
    assert set(texts) <= {"yes", "no"} and len(texts) == 2

    regex = SamplingConfig(max_tokens=12, structured=StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}"))
    (output,) = engine.generate(shard(["Give me a code."]), regex).to_pylist()
    assert output["text"][:3].isdigit() and output["text"][3] == "-"

    rows = engine.generate(
        shard(
            ["A", "B", "C", "D"],
            overrides=[
                {"max_tokens": 2},
                None,
                {"structured": {"regex": "(["}},  # invalid regex: this row fails, the others run
                {"temperature": -1},  # invalid value
            ],
        ),
        SamplingConfig(max_tokens=10),
    ).to_pylist()
    by_key = {row["request_key"]: row for row in rows}
    keys = shard(["A", "B", "C", "D"])["request_key"].to_pylist()
    assert by_key[keys[0]]["completion_tokens"] <= 2
    assert by_key[keys[1]]["error_code"] is None
    assert by_key[keys[2]]["error_code"] == "invalid_request" and "regex" in by_key[keys[2]]["error"]
    assert by_key[keys[3]]["error_code"] == "invalid_request" and "temperature" in by_key[keys[3]]["error"]


@pytest.mark.slow
def test_an_invalid_run_level_schema_is_a_configuration_error(tiny_model):
    bad = SamplingConfig(max_tokens=4, structured=StructuredOutput(json_schema={"type": "objectx"}))
    with pytest.raises(SpecError, match="sampling parameters rejected by vLLM.*objectx"):
        get_engine(tiny_model).generate(shard(["x", "y"]), bad)


@pytest.mark.slow
def test_a_lora_adapter_changes_outputs_on_the_same_engine(tiny_model, tiny_lora_dir):
    base_engine = get_engine(tiny_model)
    sampling = SamplingConfig(max_tokens=8)
    base = base_engine.generate(shard(["Write a haiku."]), sampling).to_pylist()
    adapted_config = tiny_model.model_copy(update={"lora_adapter": LoraAdapter(name="tiny", path=str(tiny_lora_dir))})
    adapted_engine = get_engine(adapted_config)
    assert adapted_engine is base_engine  # same engine arguments: no reload
    adapted = adapted_engine.generate(shard(["Write a haiku."]), sampling).to_pylist()
    assert adapted[0]["text"] != base[0]["text"]
    get_engine(tiny_model)  # back to no adapter


@pytest.mark.slow
@pytest.mark.replaces_engine
def test_another_engine_configuration_frees_the_previous_engine_first(tiny_model):
    engine = get_engine(tiny_model)
    before = engine_processes()
    swapped = get_engine(tiny_model.model_copy(update={"max_model_len": 128, "enforce_eager": True}))
    assert swapped is not engine and swapped.max_model_len == 128
    after = engine_processes()
    assert before and after and not (before & after)  # the previous engine's processes are gone


def engine_processes() -> set[int]:
    """Live processes that vLLM spawned for its engines (not the Prefect server, not the resource tracker)."""
    import psutil

    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())  # vLLM renames its processes, e.g. VLLM::EngineCore
            if child.status() != psutil.STATUS_ZOMBIE and ("spawn_main" in command or "VLLM" in command):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.mark.slow
def test_top_5_token_logprobs_are_stored_per_token_and_agree_with_vllm_scoring_the_same_tokens(tiny_model):
    from tasks.engines.loop import PendingRequest

    engine = get_engine(tiny_model)
    sampling = SamplingConfig(max_tokens=10, logprobs=5)
    outputs = engine.generate(shard(["Tell me a story.", "Name a fruit.", "Why is the sky blue?"]), sampling).to_pylist()
    for output in outputs:
        tokens = output["token_logprobs"]
        assert len(tokens) == output["completion_tokens"] > 0  # one entry per generated token
        assert all(1 <= len(t["top"]) <= 5 for t in tokens)
        for t in tokens:  # greedy: the chosen token is the top one (or tied with it: random weights tie often)
            assert t["logprob"] == t["top"][0]["logprob"]
            assert t["token_id"] in {a["token_id"] for a in t["top"] if a["logprob"] == t["logprob"]}
        assert all([a["logprob"] for a in t["top"]] == sorted((a["logprob"] for a in t["top"]), reverse=True) for t in tokens)
        assert all(isinstance(t["token"], str) for t in tokens)  # decoded alone (a partial character may decode to "")
        assert output["mean_logprob"] == pytest.approx(sum(t["logprob"] for t in tokens) / len(tokens), rel=1e-6)
        assert output["prompt_logprobs"] is None  # not asked for

    # vLLM scores the prompt followed by the answer's tokens: its prompt logprobs there are the answer's own.
    request = shard(["Tell me a story."])
    (prompt_ids,) = [engine.prompt_token_ids(None, m) for m in request["messages"].to_pylist()]
    answer_ids = [t["token_id"] for t in outputs[0]["token_logprobs"]]
    scored, _ = engine.run([PendingRequest("again", prompt_ids + answer_ids, SamplingConfig(max_tokens=1, prompt_logprobs=5))])
    places = scored[0].prompt_logprobs
    assert len(places) == len(prompt_ids) + len(answer_ids) and places[0]["logprob"] is None  # nothing before the first
    assert [p["token_id"] for p in places] == prompt_ids + answer_ids
    assert [p["logprob"] for p in places[len(prompt_ids) :]] == pytest.approx(
        [t["logprob"] for t in outputs[0]["token_logprobs"]], abs=1e-3
    )
    assert all(len(p["top"]) == 5 for p in places[1:])


def token_ids(output: dict) -> list[int]:
    return [t["token_id"] for t in output["token_logprobs"]]


@pytest.mark.slow
def test_the_whole_sampling_surface_reaches_vllm_per_row_and_does_what_it_says(tiny_model):
    import re

    engine = get_engine(tiny_model)
    tokenizer = engine.tokenizer
    eos, end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")  # <|end|>: special, not a stop
    run = SamplingConfig(max_tokens=8, logprobs=0)
    (plain,) = engine.generate(shard(["Tell me a story."]), run).to_pylist()
    ids, text = token_ids(plain), plain["text"]
    assert len(ids) == 8  # the tiny model rarely stops on its own
    # a word that is one token of the answer (bad_words bans the tokens a word encodes to)
    banned = next(i for i in ids if tokenizer.encode(tokenizer.decode([i]).lstrip(), add_special_tokens=False) == [i])
    stop = re.search(r"[A-Za-z]{2}", text)[0]
    rows = {
        "stop_id": {"stop_token_ids": [ids[2]]},
        "min_tokens": {"stop_token_ids": [ids[2]], "min_tokens": 6},
        "bad_words": {"bad_words": [tokenizer.decode([banned]).lstrip()]},
        "eos": {"logit_bias": {str(eos): 100}},
        "ignore_eos": {"logit_bias": {str(eos): 100}, "ignore_eos": True},
        "special": {"logit_bias": {str(end): 100}},
        "kept_special": {"logit_bias": {str(end): 100}, "skip_special_tokens": False},
        "truncated": {"truncate_prompt_tokens": 3},
        "stop_kept": {"stop": [stop], "extra": {"include_stop_str_in_output": True}},
        "refused": {"min_tokens": 9},  # above max_tokens: vLLM refuses this row, the others run
    }
    requests = shard(["Tell me a story."] * len(rows), overrides=list(rows.values()))
    name_of = dict(zip(requests["request_key"].to_pylist(), rows))

    pending, errors = engine.prepare(requests, run)
    sent = {name_of[p.request_key]: params for p, params in zip(pending, engine.sampling_params(pending))}
    assert (sent["min_tokens"].min_tokens, sent["min_tokens"].stop_token_ids) == (6, [ids[2]])
    assert sent["ignore_eos"].ignore_eos and not sent["eos"].ignore_eos
    assert sent["bad_words"].bad_words == rows["bad_words"]["bad_words"]
    assert sent["kept_special"].skip_special_tokens is False and sent["special"].skip_special_tokens is True
    assert sent["stop_kept"].include_stop_str_in_output and sent["stop_kept"].stop == [stop]
    assert sent["eos"].logit_bias == {eos: 100.0}
    assert isinstance(sent["refused"], ValueError) and "min_tokens" in str(sent["refused"])

    out = {name_of[o["request_key"]]: o for o in engine.generate_prepared(pending, errors, run)[0].to_pylist()}
    assert out["stop_id"]["finish_reason"] == "stop" and token_ids(out["stop_id"]) == ids[:3]
    assert out["min_tokens"]["completion_tokens"] >= 6 and ids[2] not in token_ids(out["min_tokens"])[:5]
    assert banned not in token_ids(out["bad_words"]) and token_ids(out["bad_words"]) != ids
    assert (out["eos"]["finish_reason"], out["eos"]["completion_tokens"]) == ("stop", 1)
    assert (out["ignore_eos"]["finish_reason"], token_ids(out["ignore_eos"])) == ("length", [eos] * 8)
    assert out["special"]["text"] == "" and out["kept_special"]["text"] == "<|end|>" * 8
    assert out["truncated"]["prompt_tokens"] == 3 < plain["prompt_tokens"]
    assert out["stop_kept"]["text"] == text[: text.index(stop) + len(stop)]
    assert out["refused"]["error_code"] == "invalid_request" and "min_tokens" in out["refused"]["error"]


def whitespace_bias(tokenizer) -> dict[int, float]:
    """−100 on every whitespace-only token: under a JSON constraint the random tiny model otherwise pads
    its answer with newlines until max_tokens (vLLM takes JSON's optional whitespace from its engine
    configuration, not per request)."""
    return {i: -100.0 for i in range(len(tokenizer)) if tokenizer.decode([i]) and not tokenizer.decode([i]).strip()}


@pytest.mark.slow
def test_json_object_answers_parse_and_a_prompt_truncated_to_the_context_runs(tiny_model):
    engine = get_engine(tiny_model)
    json_object = SamplingConfig(
        max_tokens=48, logit_bias=whitespace_bias(engine.tokenizer), structured=StructuredOutput(json_object=True)
    )
    outputs = engine.generate(shard([f"Question {i}?" for i in range(4)]), json_object).to_pylist()
    assert [o["finish_reason"] for o in outputs] == ["stop"] * 4
    assert all(isinstance(json.loads(o["text"]), dict) for o in outputs)

    long = "word " * 400  # longer than the context: an error row, unless truncated to fit
    rows = engine.generate(shard([long, long], overrides=[None, {"truncate_prompt_tokens": -1}]), SamplingConfig(max_tokens=4))
    by_error = {row["error_code"]: row for row in rows.to_pylist()}
    assert by_error.keys() == {"context_length_exceeded", None}
    assert by_error[None]["prompt_tokens"] == 255 and by_error[None]["completion_tokens"] == 1  # the context less one
