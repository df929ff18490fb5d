"""A reasoning model on real vLLM: the tiny model with <think> and </think> in its tokenizer, a regex
forcing each answer's shape (a thinking section, then a final answer) so vLLM's deepseek_r1 parser runs
on real engine output. Each answer is stored as reasoning and text with the tokens of each; an answer
whose budget ran out inside the thinking is flagged, and the rerun asks only that one again with a
larger budget, keeping both attempts."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.batch_inference import batch_inference
from flows.rerun_cut_off import rerun_cut_off
from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, SpecError, StructuredOutput
from tasks.export.batch_files import write_batch_result

# A small model's thinking cannot be left to chance: the constraint covers the whole answer.
SHAPE = "<think>[a-z ]{1,20}</think>[a-z ]{1,10}"

pytestmark = [pytest.mark.slow, pytest.mark.replaces_engine]  # its own engine: after the session engine's tests


@pytest.fixture(scope="module")
def thinking(tiny_thinking_model_dir):
    from transformers import AutoTokenizer

    model = ModelConfig(
        model=str(tiny_thinking_model_dir),
        max_model_len=256,
        gpu_memory_utilization=0.1,
        reasoning_parser="deepseek_r1",
        enforce_eager=True,
    )
    return model, AutoTokenizer.from_pretrained(tiny_thinking_model_dir)


def test_a_parser_that_does_not_fit_the_tokenizer_is_named(tiny_model_dir):
    from transformers import AutoTokenizer

    from tasks.engines.reasoning import reasoning_parser

    with pytest.raises(SpecError, match="reasoning_parser 'deepseek_r1' does not fit this model's tokenizer"):
        reasoning_parser("deepseek_r1", AutoTokenizer.from_pretrained(tiny_model_dir))  # no thinking markers in it


def test_answers_split_into_reasoning_and_text_and_the_rerun_asks_only_the_cut_off_one_again(
    prefect_harness, thinking, tmp_path, store, query
):
    model, tokenizer = thinking
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    questions = ["Why is the sky blue?", "Name a fruit.", "Tell me a story.", "What is two plus two?"]
    # the last row's own budget runs out inside its thinking
    table = pa.table(
        {"id": ["a", "b", "c", "cut"], "prompt": questions, "max_tokens": pa.array([None, None, None, 2], pa.int64())}
    )
    pq.write_table(table, tmp_path / "questions.parquet")
    spec = DatasetSpec(
        name="thinking",
        source=str(tmp_path / "questions.parquet"),
        id_column="id",
        prompt_column="prompt",
        override_columns=["max_tokens"],
    )
    # the markers as the tokens they are (the regex alone lets the random model spell them out byte by byte)
    sampling = SamplingConfig(max_tokens=24, logprobs=0, logit_bias={think: 5, end: 5}, structured=StructuredOutput(regex=SHAPE))
    first = batch_inference(dataset=spec, model=model, sampling=sampling, store=store)
    assert (first.outputs, first.errors) == (4, 0)

    stored = query(
        store,
        """SELECT ro.custom_id, ro.text, ro.reasoning, ro.reasoning_tokens, ro.text_tokens, ro.reasoning_truncated,
                  ro.finish_reason, ro.completion_tokens, [t.token_id FOR t IN o.token_logprobs]
           FROM run_outputs ro JOIN outputs o USING (output_id) WHERE ro.run_id = ? ORDER BY ro.custom_id""",
        [first.run_id],
    )
    for custom_id, text, reasoning, reasoning_tokens, text_tokens, truncated, finish, tokens, ids in stored[:3]:
        assert re.fullmatch("[a-z ]{1,20}", reasoning) and re.fullmatch("[a-z ]{1,10}", text), (custom_id, reasoning, text)
        assert ids[0] == think and not truncated and finish in {"stop", "length"}
        assert reasoning_tokens == ids.index(end) + 1  # up to the end of the thinking, its markers included
        assert text_tokens == len(ids) - reasoning_tokens and reasoning_tokens + text_tokens == tokens
    cut = dict(
        zip(["custom_id", "text", "reasoning", "reasoning_tokens", "text_tokens", "truncated", "finish", "tokens"], stored[3])
    )
    assert cut == {
        "custom_id": "cut",
        "text": "",
        "reasoning": cut["reasoning"],
        "reasoning_tokens": 2,
        "text_tokens": 0,
        "truncated": True,
        "finish": "length",
        "tokens": 2,
    }
    assert re.fullmatch("[a-z ]+", cut["reasoning"])

    # Exported as vllm serve --reasoning-parser answers: the thinking beside the answer, its tokens in the usage.
    from openai.types.chat import ChatCompletion

    write_batch_result(store, first.run_id, str(tmp_path / "out.jsonl"), None)
    lines = {line["custom_id"]: line for line in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    answer = ChatCompletion.model_validate(lines["a"]["response"]["body"])
    assert (answer.choices[0].message.content, answer.choices[0].message.model_extra["reasoning"]) == stored[0][1:3]
    assert answer.usage.completion_tokens_details.reasoning_tokens == stored[0][3]

    # Only the cut-off answer is asked again, with twice the largest budget it had (48), over its own 2.
    rerun = rerun_cut_off(first.run_id, store)
    assert (rerun.engine_requests, rerun.outputs) == (1, 1)
    assert query(
        store, "SELECT rerun_of, json_extract(sampling_params, '$.max_tokens') FROM runs WHERE run_id = ?", [rerun.run_id]
    ) == [(first.run_id, "48")]
    ((custom_id, first_truncated, first_tokens, truncated, tokens, text),) = query(
        store,
        "SELECT custom_id, first_reasoning_truncated, first_completion_tokens, reasoning_truncated, completion_tokens, text "
        "FROM rerun_attempts WHERE run_id = ?",
        [rerun.run_id],
    )
    assert (custom_id, first_truncated, first_tokens, truncated) == ("cut", True, 2, False)
    assert tokens > 2 and re.fullmatch("[a-z ]{1,10}", text)
    # both attempts kept: the first run still shows its cut-off answer, the newest answer is the rerun's
    assert query(store, "SELECT reasoning_truncated FROM run_outputs WHERE run_id = ? AND custom_id = 'cut'", [first.run_id]) == [
        (True,)
    ]
    assert query(store, "SELECT run_id FROM latest_outputs WHERE custom_id = 'cut'") == [(rerun.run_id,)]
    assert rerun_cut_off(rerun.run_id, store) is None  # nothing of the rerun was cut off


def test_chat_template_kwargs_change_the_prompt_the_engine_gets_and_the_parser_and_key_the_cache(
    prefect_harness, thinking, tmp_path, store, query
):
    """enable_thinking: false closes the tiny model's prompt with an empty thinking (its template honours it,
    as Qwen3's does), and deepseek_v3's parser, given it as vllm serve gives it, then splits nothing off."""
    model, tokenizer = thinking
    model = model.model_copy(update={"reasoning_parser": "deepseek_v3"})  # splits only when told thinking is on
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    questions = {"a": "Why is the sky blue?", "b": "Name a fruit."}
    pq.write_table(pa.table({"id": list(questions), "prompt": list(questions.values())}), tmp_path / "questions.parquet")
    spec = DatasetSpec(name="switch", source=str(tmp_path / "questions.parquet"), id_column="id", prompt_column="prompt")
    base = SamplingConfig(
        max_tokens=24, prompt_logprobs=0, logit_bias={think: 5, end: 5}, structured=StructuredOutput(regex=SHAPE)
    )
    runs = {
        switch: batch_inference(
            dataset=spec,
            model=model,
            sampling=base.model_copy(update={"chat_template_kwargs": {"enable_thinking": switch}}),
            store=store,
        )
        for switch in (True, False)
    }

    # two values, two cache keys: the second run answered nothing from the first
    assert [(runs[s].engine_requests, runs[s].errors) for s in (True, False)] == [(2, 0), (2, 0)]
    hashes = query(store, "SELECT sampling_hash FROM runs WHERE run_id IN (?, ?)", [runs[True].run_id, runs[False].run_id])
    assert len({h for (h,) in hashes}) == 2

    # the prompt the engine received, token by token (its prompt_logprobs name each prompt token)
    stored = {
        (switch, custom_id): (ids, reasoning, text)
        for switch in (True, False)
        for custom_id, ids, reasoning, text in query(
            store,
            "SELECT ro.custom_id, [t.token_id FOR t IN o.prompt_logprobs], ro.reasoning, ro.text "
            "FROM run_outputs ro JOIN outputs o USING (output_id) WHERE ro.run_id = ?",
            [runs[switch].run_id],
        )
    }
    for custom_id, question in questions.items():
        messages = [{"role": "user", "content": question}]
        on, off = stored[(True, custom_id)][0], stored[(False, custom_id)][0]
        assert on == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert off == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False, enable_thinking=False
        )
        assert off[: len(on)] == on and tokenizer.decode(off[len(on) :]) == "<think>\n\n</think>\n\n"
        # the parser split the thinking off only where the request said thinking is on
        _, reasoning, text = stored[(True, custom_id)]
        assert re.fullmatch("[a-z ]{1,20}", reasoning) and re.fullmatch("[a-z ]{1,10}", text)
        _, reasoning, text = stored[(False, custom_id)]
        assert reasoning is None and re.fullmatch(SHAPE, text)

    # the same value again: every answer from the cache
    again = batch_inference(
        dataset=spec,
        model=model,
        sampling=base.model_copy(update={"chat_template_kwargs": {"enable_thinking": False}}),
        store=store,
    )
    assert (again.engine_requests, again.reused_requests) == (0, 2)


def test_chat_template_kwargs_are_refused_where_no_template_reads_them():
    from tasks.inference.job import check_sampling

    with pytest.raises(ValueError, match="'add_generation_prompt' is set by the engine"):
        SamplingConfig(chat_template_kwargs={"add_generation_prompt": False})
    with pytest.raises(SpecError, match="mode 'completion' sends prompts as they are"):
        check_sampling(ModelConfig(mode="completion"), SamplingConfig(chat_template_kwargs={"enable_thinking": False}))
