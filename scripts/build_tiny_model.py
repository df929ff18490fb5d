"""Build a tiny random Llama model that real vLLM (CPU build) can load, without any download.

A byte-level BPE tokenizer trained on a few sentences, a chat template, and a 2-layer Llama with
head_dim 64 (vLLM's CPU attention kernels reject head_dim 16). Weights are random but seeded, so
every build writes the same bytes and the model fingerprint is stable across machines.

    python scripts/build_tiny_model.py [OUT_DIR]     # default: .cache/models/tiny-llama
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

# Bump when the recipe changes: an existing build with another version is rebuilt.
RECIPE_VERSION = "1"
DEFAULT_OUT = Path(".cache/models/tiny-llama")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TRAINING_TEXT = [
    "Write a short poem about the sea and the wind.",
    "Summarize the following article in three sentences.",
    "Explain how a hash table works to a new programmer.",
    "Translate this sentence into French: the weather is nice today.",
    "List five ideas for a birthday party in the park.",
    "What are the main causes of inflation? Answer briefly.",
    "Give me a recipe for a vegetarian lasagna with spinach.",
    "You are a helpful assistant. Answer the question politely and concisely.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Classify the sentiment of this review as positive, negative or neutral.",
]


def build_tiny_model(out_dir: Path = DEFAULT_OUT) -> Path:
    """Write the model into out_dir unless a build of the same recipe is already there."""
    marker = out_dir / "tiny_model_recipe.json"
    if marker.exists() and json.loads(marker.read_text()).get("recipe") == RECIPE_VERSION:
        return out_dir

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any UTF-8 text encodes
        show_progress=False,
    )
    bpe.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_dir)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(tmp_dir, safe_serialization=True)
    (tmp_dir / marker.name).write_text(json.dumps({"recipe": RECIPE_VERSION}))

    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    print(build_tiny_model(target))
