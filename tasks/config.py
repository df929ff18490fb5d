"""Typed configuration passed into flows as parameters (the Prefect UI renders these as forms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpecError(ValueError):
    """A dataset spec or configuration that cannot work; raised before anything is written."""


def describe_errors(error: ValidationError) -> str:
    """One line per problem, naming the field: `prompt_column: Field required`."""
    return "; ".join(
        f"{'.'.join(map(str, item['loc'])) or 'spec'}: {item['msg'].removeprefix('Value error, ')}"
        for item in error.errors()
    )


class ValidationConfig(BaseModel):
    """The Great Expectations suite every batch of rows passes (rows that fail are rejected, not dropped)."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Context budget per prompt, in approximate tokens (characters / 4)."
    )
    allowed_roles: list[str] = Field(["system", "user", "assistant", "tool"], description="Roles allowed in messages.")
    expectations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="More GX expectations, e.g. {type: expect_column_values_to_match_regex, kwargs: {column: prompt, regex: '\\?$'}}.",
    )
    max_rejected_share: float = Field(
        0.5, ge=0, le=1, description="The run fails when more than this share of the rows is rejected."
    )


class DedupeConfig(BaseModel):
    """Which requests count as the same: exact (normalized) and, optionally, near-duplicates."""

    model_config = ConfigDict(extra="forbid")

    normalize: bool = Field(True, description="Compare text after Unicode NFKC and whitespace folding.")
    case_fold: bool = Field(False, description="Also ignore letter case.")
    near_duplicates: bool = Field(False, description="Also fold near-duplicates (MinHash LSH) into one request.")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of shingles that counts as near-duplicate.")
    shingle_size: int = Field(3, ge=1, description="Words per shingle.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (signature length).")


InputFormat = Literal["auto", "parquet", "jsonl", "openai_batch"]


class DatasetSpec(BaseModel):
    """Where the prompts are and how each row becomes a request."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Dataset name, recorded with every dataset version.")
    source: str = Field(
        description="Parquet file, folder (Hive partitions too), glob, JSONL file or any fsspec URL."
    )
    format: InputFormat = Field("auto", description="auto: from the file names (and the first JSONL line).")
    id_column: str | None = Field(
        None, description="Column holding a unique id per row; becomes custom_id. Unset: an id derived from the row's content."
    )
    prompt_column: str | None = Field(None, description="Column holding the prompt text.")
    prompt_template: str | None = Field(
        None, description="Jinja template over the row's columns, e.g. 'Summarize: {{ text }}'."
    )
    messages_column: str | None = Field(None, description="Column holding chat messages (list of {role, content}).")
    system_prompt: str | None = Field(None, description="System message for chat mode.")
    override_columns: list[str] = Field(
        default_factory=list, description="Columns holding per-row sampling overrides (e.g. max_tokens, temperature)."
    )
    reference_column: str | None = Field(None, description="Column with a reference answer, kept for scoring.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)

    @model_validator(mode="after")
    def _one_prompt_source(self) -> DatasetSpec:
        given = sum(source is not None for source in (self.prompt_column, self.prompt_template, self.messages_column))
        # OpenAI batch lines say themselves what they send (format auto may turn out to be one).
        maybe_openai = self.format == "openai_batch" or (self.format == "auto" and not self.source.endswith(".parquet"))
        if given > 1 or (given == 0 and not maybe_openai):
            raise ValueError("set exactly one of prompt_column, prompt_template or messages_column")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetSpec:
        """Read a spec file; a relative `source` is taken relative to the spec file's folder."""
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"dataset spec {path}: file not found")
        try:
            spec = cls.model_validate(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as error:
            raise SpecError(f"dataset spec {path}: not valid YAML ({error})") from error
        except ValidationError as error:
            raise SpecError(f"dataset spec {path}: {describe_errors(error)}") from error
        if "://" not in spec.source and not Path(spec.source).is_absolute():
            spec.source = str(path.parent / spec.source)
        return spec


class ModelConfig(BaseModel):
    """The model and the vLLM engine arguments that shape its outputs or its memory."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(".cache/models/tiny-llama", description="Local model folder (Hugging Face layout).")
    revision: str | None = None
    mode: Literal["chat", "completion"] = Field(
        "chat", description="chat: apply the model's chat template; completion: send the prompt as is."
    )
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="On the CPU build: the share of system RAM kept for the KV cache."
    )
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Other vllm.LLM arguments.")


class SamplingConfig(BaseModel):
    """vLLM sampling parameters applied to every request of a run."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1)
    seed: int | None = Field(0, description="Per-request seed: sampled outputs reproduce across runs.")
    stop: list[str] = Field(default_factory=list)


class SamplingOverrides(BaseModel):
    """Sampling parameters one request may set for itself (a dataset column, an OpenAI batch body)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _openai_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_completion_tokens" in data:
            data = {**data, "max_tokens": data.get("max_tokens", data["max_completion_tokens"])}
            del data["max_completion_tokens"]
        return data


class StoreConfig(BaseModel):
    """Where results go: the DuckDB file and the folder (or fsspec URL) for shard files and cache."""

    model_config = ConfigDict(extra="forbid")

    duckdb_path: str = "results/results.duckdb"
    storage: str = Field("results/storage", description="Shard files and cached task results.")
    lock_timeout_seconds: float = Field(
        60.0, ge=0, description="How long a commit waits while another process holds the DuckDB file."
    )


class ShardingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(512, ge=1, description="Most unique requests per shard (one inference task each).")
    max_shard_tokens: int | None = Field(
        None, ge=1, description="Most approximate prompt tokens (characters / 4) per shard; unset: no budget."
    )
    group_prefixes: bool = Field(
        True, description="Order requests by their text so prompts sharing a prefix land in one shard (prefix cache)."
    )
