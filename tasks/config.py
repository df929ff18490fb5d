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


class DatasetSpec(BaseModel):
    """Where the prompts are and how each row becomes a request."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Dataset name, recorded with every dataset version.")
    source: str = Field(description="Parquet file, folder or glob. Relative to the working directory.")
    id_column: str = Field(description="Column holding a unique id per row; becomes custom_id.")
    prompt_column: str | None = Field(None, description="Column holding the prompt text.")
    prompt_template: str | None = Field(
        None, description="Jinja template over the row's columns, e.g. 'Summarize: {{ text }}'."
    )
    system_prompt: str | None = Field(None, description="System message for chat mode.")
    reference_column: str | None = Field(
        None, description="Column holding a reference answer, for the reference-based scorers (exact_match, chrf...)."
    )

    @model_validator(mode="after")
    def _one_prompt_source(self) -> DatasetSpec:
        if (self.prompt_column is None) == (self.prompt_template is None):
            raise ValueError("set exactly one of prompt_column or prompt_template")
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

    shard_size: int = Field(512, ge=1, description="Unique requests per shard (one inference task each).")
