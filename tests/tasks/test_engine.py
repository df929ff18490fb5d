import shutil

import pyarrow as pa
import pytest

from tasks.config import SamplingConfig
from tasks.engine import get_engine, model_fingerprint
from tasks.render import content_hash, request_content


def test_fingerprint_comes_from_the_files_not_the_path(tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model.model, copy)
    moved = tiny_model.model_copy(update={"model": str(copy)})
    assert model_fingerprint(moved) == model_fingerprint(tiny_model)

    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("<s>", "<s> "))
    assert model_fingerprint(moved) != model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model.model_copy(update={"revision": "v2"})) != model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model.model_copy(update={"max_model_len": 128})) != model_fingerprint(tiny_model)


def shard(prompts: list[str]) -> pa.Table:
    import json

    contents = [request_content(p, "Be brief.", "chat") for p in prompts]
    return pa.table(
        {
            "request_key": [content_hash(c) for c in contents],
            "prompt": prompts,
            "messages": [json.dumps(c["messages"]) for c in contents],
        }
    )


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

    again = engine.generate(shard(prompts), sampling).to_pylist()
    assert [o["text"] for o in again] == [o["text"] for o in outputs]  # greedy is deterministic
