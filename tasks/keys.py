"""Every content hash and fingerprint: what identifies a request, a shard, a model, an input, a result.

Cache keys are content keys. Two pieces of work with equal keys are the same work, whoever runs
them and whenever; nothing here depends on a run id or a clock.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pyarrow as pa

from tasks import prepare
from tasks.config import DatasetSpec, Mode, ModelConfig, SamplingConfig
from tasks.prepare.sources import file_keys


def content_hash(value: object) -> str:
    """A stable 32-hex-digit hash of any JSON-serializable value."""
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def template_hash(spec: DatasetSpec, mode: Mode) -> str:
    """How rows become prompts: the prompt column or template, system prompt, overrides and mode."""
    return content_hash(
        {
            "column": spec.prompt_column,
            "template": spec.prompt_template,
            "messages": spec.messages_column,
            "overrides": spec.override_columns,
            "system": spec.system_prompt,
            "mode": mode,
        }
    )


def sampling_hash(sampling: SamplingConfig) -> str:
    return content_hash(sampling.model_dump(mode="json"))


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
    "adapter_config.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def folder_fingerprint(folder: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name in FINGERPRINT_FILES:
                files[path.name] = content_hash(path.read_text(errors="replace"))
            elif path.suffix in WEIGHT_SUFFIXES:
                files[path.name] = f"size:{path.stat().st_size}"
    return files


def model_fingerprint(config: ModelConfig) -> str:
    """Identify the model as loaded: its files, revision, adapter and the engine args that change outputs."""
    files = folder_fingerprint(Path(config.model).expanduser())
    adapter = config.lora_adapter
    return content_hash(
        {
            "files": files,
            # A hub or served name stands for itself only when there is no local folder to read.
            "name": None if files else config.model,
            "revision": config.revision,
            "engine": config.engine,
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "quantization": config.quantization,
            "kv_cache_dtype": config.kv_cache_dtype,
            "mode": config.mode,
            "lora": {"name": adapter.name, "files": folder_fingerprint(Path(adapter.path))} if adapter else None,
        }
    )


def shard_key(request_keys: list[str]) -> str:
    return content_hash(request_keys)


def output_key(shard_key: str, model_fingerprint: str, sampling: SamplingConfig) -> str:
    """What a shard's outputs depend on: its requests, the model as loaded, the sampling."""
    return content_hash(
        {"task": "generate-shard", "shard": shard_key, "model": model_fingerprint, "sampling": sampling_hash(sampling)}
    )


def score_key(output_key: str, dataset_version: str, scorers_version: str) -> str:
    """A shard's scores depend on its outputs, the scorers, and the dataset (references belong to it)."""
    return content_hash([output_key, dataset_version, scorers_version])


def input_fingerprint(dataset: DatasetSpec, mode: Mode, context_tokens: int | None) -> str:
    """The input as prepared: the spec, the prompt mode and context budget, each source file's
    properties (see file_key: what tells its content apart) and the code that prepares it."""
    return content_hash(
        {
            "spec": dataset.model_dump(mode="json"),
            "mode": mode,
            "context_tokens": context_tokens,
            "files": file_keys(dataset.source),
            "code": prepare_code_version(),
        }
    )


@functools.cache
def prepare_code_version() -> str:
    """A hash of the source of the prepare package and of this module (request keys): a fix to
    reading, rendering, validation or dedupe prepares every input again instead of reusing parts."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted([*Path(prepare.__file__).parent.glob("*.py"), Path(__file__)]):
        source = path.read_bytes()
        digest.update(f"{path.name}\0{len(source)}\0".encode() + source)
    return digest.hexdigest()


class DatasetVersioner:
    """Content hash of a dataset as the pipeline sees it: every request and every rejected row."""

    def __init__(self, settings: object = None) -> None:
        self.digest = hashlib.blake2b(digest_size=16)
        self.digest.update(content_hash(settings).encode())  # what decides duplicates and rejections

    def add(self, requests: pa.Table, rejected: pa.Table) -> None:
        request_columns = ["custom_id", "request_key"]
        if "reference" in requests.column_names:
            request_columns.append("reference")
        for table, columns in ((requests, request_columns), (rejected, ["source_file", "source_row", "reason"])):
            for row in zip(*(table[c].to_pylist() for c in columns)):
                # a reference is dataset content too; a missing one adds nothing
                self.digest.update("\t".join(str(value) for value in row if value is not None).encode() + b"\n")

    def version(self) -> str:
        return self.digest.hexdigest()


CURATED_FORMAT = "chat-jsonl-v1"


def curated_version(name: str, records: list[dict]) -> tuple[str, str]:
    """(version, content hash) of a curated dataset: same records, same version, wherever it is built."""
    canonical = json.dumps(records, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical).hexdigest()
    return hashlib.sha256(f"{CURATED_FORMAT}:{name}:{digest}".encode()).hexdigest()[:16], digest
