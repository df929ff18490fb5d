"""Content keys and fingerprints: what changes a key, and what must not."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.config import LoraAdapter, SamplingConfig, StructuredOutput
from tasks.keys import model_fingerprint, sampling_hash


def test_fingerprint_comes_from_the_files_not_the_path(tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model.model, copy)
    moved = tiny_model.model_copy(update={"model": str(copy)})
    assert model_fingerprint(moved) == model_fingerprint(tiny_model)

    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("<s>", "<s> "))
    assert model_fingerprint(moved) != model_fingerprint(tiny_model)
    for change in (
        {"revision": "v2"},
        {"max_model_len": 128},
        {"dtype": "bfloat16"},
        {"engine": "openai", "base_url": "http://x/v1"},
    ):
        assert model_fingerprint(tiny_model.model_copy(update=change)) != model_fingerprint(tiny_model)
    # engine arguments that change speed or memory, not outputs, keep the cache
    assert model_fingerprint(tiny_model.model_copy(update={"max_num_seqs": 8})) == model_fingerprint(tiny_model)


def test_fingerprint_includes_the_lora_adapter_files(tiny_model, tiny_lora_dir, tmp_path):
    with_adapter = tiny_model.model_copy(update={"lora_adapter": LoraAdapter(name="a", path=str(tiny_lora_dir))})
    assert model_fingerprint(with_adapter) != model_fingerprint(tiny_model)
    copy = tmp_path / "lora"
    shutil.copytree(tiny_lora_dir, copy)
    (copy / "adapter_config.json").write_text(json.dumps({**json.loads((copy / "adapter_config.json").read_text()), "r": 4}))
    changed = tiny_model.model_copy(update={"lora_adapter": LoraAdapter(name="a", path=str(copy))})
    assert model_fingerprint(changed) != model_fingerprint(with_adapter)


def test_weights_are_keyed_by_their_content_not_their_name_and_size(tiny_model, tmp_path, overwrite_weights):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model.model, copy)
    model = tiny_model.model_copy(update={"model": str(copy)})
    before = model_fingerprint(model, tmp_path / "memo.json")
    overwrite_weights(copy)
    assert model_fingerprint(model, tmp_path / "memo.json") != before
    (copy / "added_tokens.json").write_text("{}")  # any tokenizer file, not only a known list
    assert model_fingerprint(model) != model_fingerprint(model.model_copy(update={"model": tiny_model.model}))


def test_engine_kwargs_and_the_seed_are_in_the_key(tiny_model):
    base = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model.model_copy(update={"seed": 1})) != base
    assert model_fingerprint(tiny_model.model_copy(update={"engine_kwargs": {"hf_overrides": {"rope_theta": 1.0}}})) != base


MEASURE_READS = """
import json, sys
from pathlib import Path
from tasks.config import ModelConfig
from tasks.keys import model_fingerprint

def bytes_read():
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

model, memo = ModelConfig(model=sys.argv[1]), Path(sys.argv[2])
before = bytes_read()
key = model_fingerprint(model, memo)
print(json.dumps({"key": key, "read": bytes_read() - before}))
"""


def fingerprint_in_a_process(model_dir, memo) -> dict:
    """The key, and the bytes the process read to compute it (the kernel's count, /proc/self/io rchar)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_READS, str(model_dir), str(memo)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_the_memo_spares_reading_unchanged_weights_again_and_notices_new_ones(tiny_model, tmp_path, overwrite_weights):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model.model, copy)
    weights = (copy / "model.safetensors").stat().st_size
    memo = tmp_path / "file-hashes.json"

    first = fingerprint_in_a_process(copy, memo)
    assert first["read"] >= weights  # every byte hashed once
    entry = json.loads(memo.read_text())[str((copy / "model.safetensors").resolve())]
    stat = (copy / "model.safetensors").stat()
    assert entry["stamp"] == [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]

    second = fingerprint_in_a_process(copy, memo)
    assert second["key"] == first["key"] and second["read"] < weights / 4  # the memo, not the weights

    overwrite_weights(copy)
    third = fingerprint_in_a_process(copy, memo)
    assert third["key"] != first["key"] and third["read"] >= weights


HUB_KEY = """
import sys
from tasks.config import ModelConfig
from tasks.keys import model_fingerprint
print(model_fingerprint(ModelConfig(model="org/tiny", revision=sys.argv[1] or None)))
"""


def hub_key(cache, revision: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-c", HUB_KEY, revision], capture_output=True, text=True, env=env)


def test_a_hub_id_is_keyed_by_the_commit_its_revision_points_at(tmp_path):
    refs = tmp_path / "models--org--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    first = hub_key(tmp_path)
    assert first.returncode == 0, first.stderr
    assert hub_key(tmp_path, "a" * 40).stdout == first.stdout  # main is that commit
    (refs / "main").write_text("b" * 40)  # main moved on: new weights, new key
    moved = hub_key(tmp_path)
    assert moved.returncode == 0 and moved.stdout != first.stdout
    missing = hub_key(tmp_path, "v2")
    assert missing.returncode != 0 and "org/tiny: revision v2 is not in the local hub cache" in missing.stderr


def test_fields_added_to_sampling_keep_the_keys_of_runs_that_do_not_set_them():
    # Hashes from before logit_bias and json_object existed: a stored run's cached shards stay its own.
    assert sampling_hash(SamplingConfig()) == "97bc4936cad77207da6bb8b20da16fb5"
    regex = SamplingConfig(max_tokens=8, structured=StructuredOutput(regex="[a-z]+"))
    assert sampling_hash(regex) == "a526aa15b4fd82344ae268293cd2a5f2"
    added = [
        {"logit_bias": {5: 1.0}},
        {"structured": StructuredOutput(json_object=True)},
        {"structured": StructuredOutput(grammar="root ::= 'a'")},
        {"min_tokens": 2},
        {"ignore_eos": True},
        {"stop_token_ids": [5]},
        {"bad_words": ["x"]},
        {"skip_special_tokens": False},
        {"truncate_prompt_tokens": 8},
        {"extra": {"include_stop_str_in_output": True}},
        {"max_tokens_wins": True},
    ]
    keys = {sampling_hash(SamplingConfig(**fields)) for fields in added}
    assert len(keys) == len(added) and "97bc4936cad77207da6bb8b20da16fb5" not in keys  # each set field is in the key


def test_a_reasoning_parser_is_in_the_model_key_and_an_unset_one_changes_nothing(tiny_model):
    base = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model.model_copy(update={"reasoning_parser": None})) == base
    assert model_fingerprint(tiny_model.model_copy(update={"reasoning_parser": "deepseek_r1"})) != base
