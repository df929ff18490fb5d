"""Build a tiny random Llama model that real vLLM (CPU build) can load, without any download.

A byte-level BPE tokenizer trained on a few sentences, a chat template, and a 2-layer Llama with
head_dim 64 (vLLM's CPU attention kernels reject head_dim 16). Weights are random but seeded, so
every build writes the same bytes and the model fingerprint is stable across machines.

    python scripts/build_tiny_model.py [OUT_DIR]     # default: .cache/models/tiny-llama (+ OUT_DIR-lora, OUT_DIR-thinking)

OUT_DIR-thinking is the same model with a reasoning model's thinking markers, <think> and </think>,
added to a copy of its tokenizer (and two rows to its embeddings), for vLLM's reasoning parsers; its
chat template honours `enable_thinking` as Qwen3's does (false: an empty thinking section closes the
prompt).
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


def build_tiny_lora(model_dir: Path, out_dir: Path, rank: int = 8) -> Path:
    """A random LoRA adapter (PEFT layout) on q_proj and v_proj of the tiny model; seeded, idempotent."""
    marker = out_dir / "tiny_model_recipe.json"
    if marker.exists() and json.loads(marker.read_text()).get("recipe") == RECIPE_VERSION:
        return out_dir

    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    generator = torch.Generator().manual_seed(1)
    weights = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.5
            # B is zero in a fresh adapter; random here so the adapter visibly changes outputs
            weights[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) * 0.5
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    marker.write_text(json.dumps({"recipe": RECIPE_VERSION}))
    return out_dir


THINKING_TOKENS = ["<think>", "</think>"]
# Unset or true: the same prompt as CHAT_TEMPLATE's; false: the answer starts after an empty thinking.
THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# The thinking model's recipe: the shared one and its own (2: the template above). Only the thinking
# model's marker has the second key, so a checkout that knows only RECIPE_VERSION takes this build as is.
THINKING_RECIPE = {"recipe": RECIPE_VERSION, "thinking": "2"}


def build_tiny_thinking_model(model_dir: Path, out_dir: Path) -> Path:
    """The tiny model with <think> and </think> as tokens of their own (not special: they stay in the
    text, as DeepSeek-R1's do) and a template that honours enable_thinking; the new embedding rows are
    seeded, so every build is the same."""
    marker = out_dir / "tiny_model_recipe.json"
    if marker.exists() and json.loads(marker.read_text()) == THINKING_RECIPE:
        return out_dir

    import torch
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in THINKING_TOKENS])
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tokenizer))
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_dir)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    (tmp_dir / marker.name).write_text(json.dumps(THINKING_RECIPE))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


if __name__ == "__main__":
    from transformers.utils import logging as transformers_logging

    # The embedding-resize notice and the weight-loading bar say nothing about a seeded toy model.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    built = [
        build_tiny_model(target),
        build_tiny_lora(target, target.with_name(target.name + "-lora")),
        build_tiny_thinking_model(target, target.with_name(target.name + "-thinking")),
    ]
    print("tiny models:", ", ".join(str(path) for path in built))
