"""Content keys and fingerprints: what changes a key, and what must not."""

import json
import shutil

from tasks.config import LoraAdapter
from tasks.keys import model_fingerprint


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
