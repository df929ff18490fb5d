"""Token logprobs through the whole flow on real vLLM: stored per token in the results file (queried with SQL),
and returned in OpenAI's `choices[].logprobs` shape for the batch lines that asked, null for the others."""

import json

import pyarrow.parquet as pq
import pytest

from flows.batch_inference import batch_inference
from flows.export_outputs import export_outputs
from tasks.config import SamplingConfig, ShardingConfig, openai_batch_dataset
from tasks.export.batch_files import write_batch_result

pytestmark = pytest.mark.slow


def batch_file_line(custom_id: str, url: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", "max_tokens": 6, **body}})


def test_batch_lines_that_ask_get_openais_logprobs_and_the_store_keeps_each_token(
    prefect_harness, tiny_model, tmp_path, store, query
):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    question = [{"role": "user", "content": "Name a fruit."}]
    (tmp_path / "batch.jsonl").write_text(
        "\n".join(
            [
                batch_file_line("asks", "/v1/chat/completions", messages=question, logprobs=True, top_logprobs=2),
                batch_file_line("plain", "/v1/chat/completions", messages=question),
                batch_file_line("completion", "/v1/completions", prompt="Once upon a time", logprobs=3),
            ]
        )
        + "\n"
    )
    summary = batch_inference(
        dataset=openai_batch_dataset(str(tmp_path / "batch.jsonl"), "batch"),
        model=tiny_model,
        sampling=SamplingConfig(),
        sharding=ShardingConfig(),
        store=store,
    )
    assert summary.outputs == 3 and summary.errors == 0

    # In the store: one entry per generated token for the lines that asked, none for the other.
    stored = {
        row[0]: row[1:]
        for row in query(
            store,
            """SELECT ro.custom_id, len(o.token_logprobs), o.completion_tokens, list_max([len(t.top) FOR t IN o.token_logprobs]),
                      o.mean_logprob - list_avg([t.logprob FOR t IN o.token_logprobs])
               FROM run_outputs ro JOIN outputs o USING (output_id)""",
        )
    }
    assert stored["asks"][0] == stored["asks"][1] > 0 and stored["asks"][2] == 2 and abs(stored["asks"][3]) < 1e-6
    assert stored["completion"][0] == stored["completion"][1] and stored["completion"][2] == 3
    assert stored["plain"] == (None, stored["plain"][1], None, None)
    tokens = query(store, "SELECT count(*) FROM outputs, UNNEST(token_logprobs) AS t(token)")[0][0]
    assert tokens == stored["asks"][0] + stored["completion"][0]  # each token a row of its own to SQL

    files = write_batch_result(store, summary.run_id, str(tmp_path / "out.jsonl"), str(tmp_path / "errors.jsonl"))
    assert (files.output_lines, files.error_lines) == (3, 0)
    lines = {line["custom_id"]: line for line in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    asks = ChatCompletion.model_validate(lines["asks"]["response"]["body"]).choices[0]
    assert len(asks.logprobs.content) == stored["asks"][1]
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in asks.logprobs.content)
    assert all(t.bytes == list(t.token.encode()) for t in asks.logprobs.content)
    assert lines["plain"]["response"]["body"]["choices"][0]["logprobs"] is None
    assert ChatCompletion.model_validate(lines["plain"]["response"]["body"]).choices[0].logprobs is None
    completion = Completion.model_validate(lines["completion"]["response"]["body"]).choices[0].logprobs
    assert len(completion.tokens) == len(completion.token_logprobs) == len(completion.text_offset) == stored["completion"][1]
    assert all(3 <= len(places) <= 4 for places in completion.top_logprobs)  # the top 3 and the chosen token

    # The Parquet export carries them for distillation, and a condition can use them.
    (exported,) = export_outputs(str(tmp_path / "export"), summary.run_id, "token_logprobs IS NOT NULL", ["parquet"], store)
    table = pq.read_table(exported.path)
    by_id = dict(zip(table["custom_id"].to_pylist(), table["token_logprobs"].to_pylist()))
    assert sorted(by_id) == ["asks", "completion"]
    assert [t["logprob"] for t in by_id["asks"]] == [t.logprob for t in asks.logprobs.content]
