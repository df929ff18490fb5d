"""The in-process vLLM engine: built once per process, reused by every shard, one generate at a time."""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import pyarrow as pa

from tasks.config import ModelConfig, SamplingConfig
from tasks.render import content_hash

OUTPUT_SCHEMA = pa.schema(
    [
        ("request_key", pa.string()),
        ("sample_index", pa.int32()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("error_code", pa.string()),
        ("error", pa.string()),
    ]
)

# Files whose bytes decide what the model computes; weights are identified by name and size
# (hashing gigabytes of weights on every run would cost more than it protects).
FINGERPRINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def model_fingerprint(config: ModelConfig) -> str:
    """Identify the model as loaded: its files, revision and the engine args that change outputs."""
    folder = Path(config.model)
    files: dict[str, str] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name in FINGERPRINT_FILES:
                files[path.name] = content_hash(path.read_text(errors="replace"))
            elif path.suffix in WEIGHT_SUFFIXES:
                files[path.name] = f"size:{path.stat().st_size}"
    return content_hash(
        {
            "files": files,
            # A hub name stands for itself only when there is no local folder to read.
            "name": None if files else config.model,
            "revision": config.revision,
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "mode": config.mode,
        }
    )


def sampling_hash(sampling: SamplingConfig) -> str:
    return content_hash(sampling.model_dump(mode="json"))


def error_row(request_key: str, code: str, message: str, prompt_tokens: int | None = None) -> dict:
    return {
        "request_key": request_key,
        "sample_index": 0,
        "text": None,
        "finish_reason": None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": None,
        "error_code": code,
        "error": message,
    }


class VllmEngine:
    def __init__(self, config: ModelConfig):
        from vllm import LLM

        if not Path(config.model).exists() and "/" not in config.model:
            raise FileNotFoundError(f"model {config.model}: no such folder")
        self.config = config
        self.llm = LLM(
            model=config.model,
            revision=config.revision,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            **config.engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.requests_sent = 0  # how many requests reached the engine in this process

    def prompt_token_ids(self, prompt: str | None, messages: str | None) -> list[int]:
        if messages is not None:
            return list(
                self.tokenizer.apply_chat_template(
                    json.loads(messages), add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return list(self.tokenizer.encode(prompt))

    def generate(self, shard: pa.Table, sampling: SamplingConfig) -> pa.Table:
        """One generate call for the whole shard so vLLM batches it continuously.

        A request that cannot run on its own (prompt longer than the context) becomes an error
        row instead of failing the shard, like the error file of an OpenAI batch.
        """
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop=sampling.stop or None,
        )
        rows: list[dict] = []
        runnable: list[tuple[str, list[int]]] = []
        for request_key, prompt, messages in zip(
            shard["request_key"].to_pylist(), shard["prompt"].to_pylist(), shard["messages"].to_pylist()
        ):
            try:
                token_ids = self.prompt_token_ids(prompt, messages)
            except Exception as error:  # a template that rejects these messages, say
                rows.append(error_row(request_key, "invalid_prompt", f"{type(error).__name__}: {error}"))
                continue
            if len(token_ids) >= self.max_model_len:
                rows.append(
                    error_row(
                        request_key,
                        "context_length_exceeded",
                        f"prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len}",
                        len(token_ids),
                    )
                )
                continue
            runnable.append((request_key, token_ids))

        self.requests_sent += len(runnable)
        results = self.llm.generate(
            [{"prompt_token_ids": token_ids} for _, token_ids in runnable], params, use_tqdm=False
        )
        for (request_key, token_ids), result in zip(runnable, results):
            for sample_index, completion in enumerate(result.outputs):
                rows.append(
                    {
                        "request_key": request_key,
                        "sample_index": sample_index,
                        "text": completion.text,
                        "finish_reason": completion.finish_reason,
                        "prompt_tokens": len(token_ids),
                        "completion_tokens": len(completion.token_ids),
                        "error_code": None,
                        "error": None,
                    }
                )
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)

    def close(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm


_engine_lock = threading.Lock()
_engine: VllmEngine | None = None


def get_engine(config: ModelConfig) -> VllmEngine:
    """The process's engine for this config; another config replaces (and frees) the previous one."""
    global _engine
    with _engine_lock:
        if _engine is not None and _engine.config != config:
            _close_engine()
        if _engine is None:
            _engine = VllmEngine(config)
        return _engine


def close_engine() -> None:
    """Stop the engine's processes now rather than at interpreter exit."""
    with _engine_lock:
        _close_engine()


def _close_engine() -> None:
    global _engine
    if _engine is not None:
        _engine.close()
        _engine = None
        gc.collect()


# vllm.LLM is not thread-safe: shard tasks run in threads and take turns on the engine.
generate_lock = threading.Lock()


def generate_with_engine(config: ModelConfig, shard: pa.Table, sampling: SamplingConfig) -> tuple[pa.Table, float]:
    engine = get_engine(config)
    with generate_lock:
        started = time.perf_counter()
        outputs = engine.generate(shard, sampling)
        return outputs, time.perf_counter() - started
