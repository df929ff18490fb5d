"""The job every shard of a run is computed with, and the manifest a computed shard leaves behind."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks import keys, storage
from tasks.config import ModelConfig, SamplingConfig, ShardingConfig, SpecError
from tasks.engines.base import TRANSIENT, GenerateResult
from tasks.prepare.shard import Shard


class InferenceJob(BaseModel):
    """What a run's shards are computed with: the model (and its fingerprint), the sampling, where
    results go, and how shards are cut and retried. One value, so every step gets all of it."""

    model_config = ConfigDict(protected_namespaces=())

    model: ModelConfig
    sampling: SamplingConfig
    model_fingerprint: str
    storage: str
    sharding: ShardingConfig = ShardingConfig()

    @property
    def sampling_hash(self) -> str:
        return keys.sampling_hash(self.sampling)

    def output_key(self, shard: Shard) -> str:
        return keys.output_key(shard.shard_key, self.model_fingerprint, self.sampling)

    def output_path(self, shard: Shard) -> str:
        return storage.join(self.storage, "outputs", f"{self.output_key(shard)}.parquet")

    def journal_folder(self, shard: Shard) -> str:
        return storage.join(self.storage, "journal", self.output_key(shard))

    def manifest_path(self, shard: Shard) -> str:
        """The shard's cache record: its ShardOutput as JSON, next to its output file."""
        return storage.join(self.storage, "outputs", f"{self.output_key(shard)}.json")


class ShardOutput(BaseModel):
    """A computed shard: where its outputs are, and what they cost."""

    shard_key: str
    output_key: str
    path: str
    requests: int
    outputs: int
    errors: int
    transient_errors: int = 0  # asked again by the next run: a cached shard with any is computed again
    prompt_tokens: int
    completion_tokens: int
    generate_seconds: float
    batch_size: int  # requests per engine submission (smaller after an out-of-memory)
    max_num_seqs: int | None  # the engine's; None for the openai engine
    engine_load_seconds: float  # how long the process's first shard waited for the engine to start
    engine_requests: int  # requests this attempt answered with the engine (not failed checks, not resumed)


def read_manifest(job: InferenceJob, shard: Shard) -> ShardOutput | None:
    """The shard as computed before, or None: a cache miss.

    The record lives on storage other machines write to, so it is read as plain data and trusted
    only as far as it checks out: its keys and path are this shard's, and its output file is there.
    """
    path = job.manifest_path(shard)
    if not storage.exists(path):
        return None
    try:
        output = ShardOutput.model_validate_json(storage.read_text(path))
    except (ValidationError, UnicodeDecodeError):
        return None  # damaged or not ours: computed again, and the record rewritten
    expected = (shard.shard_key, job.output_key(shard), job.output_path(shard))
    if (output.shard_key, output.output_key, output.path) != expected or not storage.exists(output.path):
        return None
    return output


def reusable(output: ShardOutput | None) -> bool:
    """Whether a shard's manifest stands for its work: not when it has transient errors (asked again)."""
    return output is not None and not output.transient_errors


def output_file(shard: Shard, key: str, outputs: pa.Table) -> pa.Table:
    """The engine's records with the shard and output keys they belong to (lineage in the store)."""
    outputs = outputs.append_column("shard_key", pa.array([shard.shard_key] * outputs.num_rows, pa.string()))
    return outputs.append_column("output_key", pa.array([key] * outputs.num_rows, pa.string()))


def summarize_outputs(shard: Shard, key: str, path: str, result: GenerateResult, fresh: pa.Table) -> ShardOutput:
    """The shard's manifest; `fresh` are the records this attempt computed (the others were kept from before)."""
    outputs = result.outputs
    ok = outputs.filter(pc.is_null(outputs["error_code"]))
    answered = fresh.filter(pc.is_null(fresh["error_code"]))["request_key"]
    return ShardOutput(
        shard_key=shard.shard_key,
        output_key=key,
        path=path,
        requests=shard.requests,
        outputs=outputs.num_rows,
        errors=outputs.num_rows - ok.num_rows,
        transient_errors=pc.sum(pc.equal(outputs["error_kind"], TRANSIENT)).as_py() or 0,
        prompt_tokens=pc.sum(ok["prompt_tokens"]).as_py() or 0,
        completion_tokens=pc.sum(ok["completion_tokens"]).as_py() or 0,
        generate_seconds=result.seconds,
        batch_size=result.batch_size,
        max_num_seqs=result.max_num_seqs,
        engine_load_seconds=result.engine_load_seconds,
        engine_requests=pc.count_distinct(answered).as_py() if len(answered) else 0,
    )


def check_model(model: ModelConfig) -> None:
    """A local model folder that is not there is a configuration mistake: say so before any work."""
    if model.engine == "vllm" and keys.is_local(model.model) and not (Path(model.model).expanduser() / "config.json").is_file():
        raise SpecError(
            f"model {model.model}: no model folder with a config.json there (for the bundled tiny model run `make tiny-model`)"
        )


def check_sampling(model: ModelConfig, sampling: SamplingConfig) -> None:
    """The run's sampling as vLLM's own checks see it (min_tokens above max_tokens, a stop_token_id
    below 0, an `extra` value of the wrong kind), before any work: a SpecError naming the problem."""
    if sampling.chat_template_kwargs and model.mode == "completion":
        raise SpecError("sampling.chat_template_kwargs: mode 'completion' sends prompts as they are, through no chat template")
    if model.engine != "vllm":
        return  # the server judges
    from vllm.exceptions import VLLMClientError

    from tasks.engines.vllm import vllm_sampling_params

    try:
        vllm_sampling_params(sampling, sampling.max_tokens)
    except (ValueError, TypeError, VLLMClientError) as error:
        raise SpecError(f"sampling parameters rejected by vLLM: {error}") from error


# Retrying cannot fix a configuration mistake: those fail at once with their message.
PERMANENT_ERRORS = (SpecError, ValueError, TypeError, FileNotFoundError, ImportError)


def split_groups(shards: list[Shard], n_groups: int) -> list[list[Shard]]:
    """At most n_groups groups of about equal requests; each keeps the shards' order."""
    loads = [0] * max(1, n_groups)
    members: list[list[int]] = [[] for _ in loads]
    for index in sorted(range(len(shards)), key=lambda i: -shards[i].requests):
        lightest = loads.index(min(loads))
        loads[lightest] += shards[index].requests
        members[lightest].append(index)
    return [[shards[i] for i in sorted(group)] for group in members if group]
