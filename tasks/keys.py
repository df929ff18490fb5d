"""Every content hash and fingerprint: what identifies a request, a shard, a model, an input, a result.

Cache keys are content keys. Two pieces of work with equal keys are the same work, whoever runs
them and whenever; nothing here depends on a run id or a clock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa

from tasks import prepare
from tasks.config import DatasetSpec, Mode, ModelConfig, SamplingConfig, SpecError
from tasks.prepare.sources import file_keys


def content_hash(value: object) -> str:
    """A stable 32-hex-digit hash of any JSON-serializable value."""
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def template_hash(spec: DatasetSpec, mode: Mode) -> str:
    """How rows become prompts: the prompt column or template, system prompt, overrides and mode."""
    # the columns of a row's own sampling count only when set: earlier specs keep their hash
    row_sampling = spec.model_dump(include={"sampling_column", "structured_columns"}, exclude_none=True)
    return content_hash(
        {
            "column": spec.prompt_column,
            "template": spec.prompt_template,
            "messages": spec.messages_column,
            "overrides": spec.override_columns,
            "system": spec.system_prompt,
            "mode": mode,
            **row_sampling,
        }
    )


def sampling_hash(sampling: SamplingConfig) -> str:
    return content_hash(sampling.model_dump(mode="json"))


# Files that decide nothing the model computes; every other file of a model or adapter folder is in its key.
IGNORED_FILES = ("README.md", "LICENSE", "LICENSE.txt", "USE_POLICY.md")
HASH_CHUNK_BYTES = 8 << 20


def file_hash(path: Path) -> str:
    """blake2b of the file's bytes, read in 8 MB chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class HashMemo:
    """Content hashes remembered by path, size, mtime, ctime and inode, in a small JSON file: a
    100 GB model is read once, not on every run. A file rewritten in place gets a new mtime and
    ctime, a file replaced a new inode: either way it is hashed again. None: no memo, every file is read.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.changed = False
        self.entries: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a memo cut short by a crash: hash again

    def hash(self, path: Path) -> str:
        stat = path.stat()  # of the target: a hub snapshot links to its blobs
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        name = str(path.resolve())
        entry = self.entries.get(name)
        if entry is not None and entry.get("stamp") == stamp:
            return entry["hash"]
        self.entries[name] = {"stamp": stamp, "hash": file_hash(path)}
        self.changed = True
        return self.entries[name]["hash"]

    def save(self) -> None:
        """Written whole and renamed into place: a reader sees the old memo or the new one, never half."""
        if self.path is None or not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(self.entries, sort_keys=True))
        os.replace(partial, self.path)
        self.changed = False


def hash_memo_path(storage: str) -> Path | None:
    """The memo of a store's storage folder (a local folder only)."""
    return None if "://" in storage else Path(storage) / "file-hashes.json"


def folder_fingerprint(folder: Path, memo: HashMemo) -> dict[str, str]:
    """Every file of the folder (and its subfolders) by content: weights, config and every tokenizer file."""
    files: dict[str, str] = {}
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if any(part.startswith(".") for part in relative.parts) or path.name in IGNORED_FILES or not path.is_file():
                continue
            files[relative.as_posix()] = memo.hash(path)
    return files


COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_commit(model: str, revision: str | None) -> str:
    """The commit a hub id's revision (default main) stands for, from the local hub cache's refs."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip()
    raise SpecError(
        f"model {model}: revision {revision or 'main'} is not in the local hub cache ({ref}): download it first "
        f"(hf download {model}) or set revision to a commit hash, so the cache key names the exact weights"
    )


def is_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def model_fingerprint(config: ModelConfig, memo_path: Path | None = None, served: dict | None = None) -> str:
    """Identify the model as loaded: its files by content (or its hub commit, or what the server reports
    it serves), its adapter, and the engine args that change outputs.

    `served` is the openai engine's model card (`openai.served_model`); `memo_path` remembers file hashes.
    """
    memo = HashMemo(memo_path)
    adapter = config.lora_adapter
    if config.engine == "openai":
        # the server's own word on what it serves, and the user's revision for what it cannot say
        model = {"served": served or {"id": config.model}}
    elif is_local(config.model):
        model = {"files": folder_fingerprint(Path(config.model).expanduser(), memo)}
    else:
        model = {"hub": config.model, "revision": hub_commit(config.model, config.revision)}
    fingerprint = content_hash(
        {
            "revision": config.revision,  # for a server, the user's word on what it cannot report
            **model,  # a hub id's revision: the commit it stands for
            "engine": config.engine,
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "quantization": config.quantization,
            "kv_cache_dtype": config.kv_cache_dtype,
            "mode": config.mode,
            "seed": config.seed,
            "speculative_config": config.speculative_config,
            "engine_kwargs": config.model_dump(mode="json")["engine_kwargs"],
            "lora": {"name": adapter.name, "files": folder_fingerprint(Path(adapter.path), memo)} if adapter else None,
            # how an answer is split into thinking and text (only when set: earlier fingerprints stay)
            **({"reasoning_parser": config.reasoning_parser} if config.reasoning_parser else {}),
        }
    )
    memo.save()
    return fingerprint


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
