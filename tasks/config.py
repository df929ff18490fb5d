"""Typed configuration passed into flows as parameters (the Prefect UI renders these as forms)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from tasks.redact import redact, redact_options

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class SpecError(ValueError):
    """A dataset spec or configuration that cannot work; raised before anything is written.

    Its message names the file or URL at fault, without the URL's credentials: it is logged."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


def describe_errors(error: ValidationError) -> str:
    """One line per problem, naming the field: `prompt_column: Field required` (a whole-model problem names none)."""
    problems = []
    for item in error.errors():
        field = ".".join(map(str, item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)


def unset(value: object) -> bool:
    """Fields added after runs were stored are left out of a dump while unset, so existing keys (sampling, input, model) stay the same."""
    return value is None


# The request columns an expectation can name; any other column it names is read from the dataset.
REQUEST_COLUMNS = (
    "custom_id",
    "request_key",
    "prompt",
    "messages",
    "overrides",
    "reference",
    "source_file",
    "source_row",
    "dedupe_text",
    "approx_tokens",
    "roles",
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
        description="More GX expectations, e.g. {type: expect_column_values_to_match_regex, kwargs: {column: prompt, regex: '\\?$'}}; "
        "a column may be a request column (custom_id, prompt, messages, reference, approx_tokens, ...) or one of the dataset's own.",
    )
    max_rejected_share: float = Field(
        0.5, ge=0, le=1, description="The run fails when more than this share of the rows is rejected."
    )

    def source_columns(self) -> list[str]:
        """The dataset's own columns that the expectations name (request columns take precedence)."""
        named = []
        for expectation in self.expectations:
            kwargs = expectation.get("kwargs")
            if not isinstance(kwargs, dict):
                continue  # the validator reports the malformed expectation
            named += [kwargs.get(key) for key in ("column", "column_A", "column_B")]
            named += list(kwargs.get("column_list") or [])
        return list(dict.fromkeys(c for c in named if isinstance(c, str) and c not in REQUEST_COLUMNS))


class DedupeConfig(BaseModel):
    """Which requests count as the same, and so share one answer: identical ones, or, when asked, looser matches."""

    model_config = ConfigDict(extra="forbid")

    match: Literal["exact", "normalized"] = Field(
        "exact",
        description="exact: requests share an answer only when the model would receive the same request (same "
        "prompt or messages, byte for byte, and same overrides). normalized: also when they differ only by "
        "Unicode NFKC (x² = x2, ½ = 1⁄2, ﬁ = fi, full-width = ASCII, unit symbols) and whitespace (runs of "
        "spaces, tabs and newlines are one space, ends trimmed: code differing in indentation merges).",
    )
    case_fold: bool = Field(False, description="With match: normalized, also ignore letter case.")
    near_duplicates: bool = Field(False, description="Also fold near-duplicates (MinHash LSH) into one request.")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of shingles that counts as near-duplicate.")
    shingle_size: int = Field(3, ge=1, description="Words per shingle.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (signature length).")
    fan_out: bool = Field(
        True,
        description="Each duplicate gets its canonical request's answer in run_outputs and exports, so every "
        "input row has an answer; off: only canonical requests have answers (duplicates keep duplicate_of).",
    )

    @model_validator(mode="after")
    def _case_fold_needs_normalized(self) -> DedupeConfig:
        if self.case_fold and self.match != "normalized":
            raise ValueError("case_fold needs match: normalized (exact matching compares requests as sent)")
        return self


InputFormat = Literal["auto", "parquet", "jsonl", "openai_batch"]
Mode = Literal["chat", "completion"]


class DatasetSpec(BaseModel):
    """Where the prompts are and how each row becomes a request."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Dataset name, recorded with every dataset version.")
    source: str = Field(
        description="Parquet file, folder (Hive partitions too), glob, JSONL file or any fsspec URL. Recorded without "
        "credentials: a URL that needs them goes in a Secret block named by source_secret."
    )
    source_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the source URL with its credentials "
        "(https://user:password@host/data.parquet); read in place of `source`, which names the data in the records.",
    )
    format: InputFormat = Field("auto", description="auto: from the file names (and the first JSONL line).")
    id_column: str | None = Field(
        None, description="Column holding a unique id per row; becomes custom_id. Unset: an id derived from the row's content."
    )
    prompt_column: str | None = Field(None, description="Column holding the prompt text.")
    prompt_template: str | None = Field(None, description="Jinja template over the row's columns, e.g. 'Summarize: {{ text }}'.")
    messages_column: str | None = Field(None, description="Column holding chat messages (list of {role, content}).")
    system_prompt: str | None = Field(None, description="System message for chat mode.")
    override_columns: list[str] = Field(
        default_factory=list, description="Columns holding per-row sampling overrides (e.g. max_tokens, temperature)."
    )
    sampling_column: str | None = Field(
        None,
        exclude_if=unset,
        description="Column holding a row's own sampling as a JSON object (text, or a struct): any per-row sampling field, "
        'e.g. {"min_tokens": 4, "stop_token_ids": [7], "structured": {"regex": "[0-9]+"}, "extra": {"include_stop_str_in_output": true}}.',
    )
    structured_columns: dict[Literal["json_schema", "regex", "choice", "grammar"], str] | None = Field(
        None,
        exclude_if=unset,
        description="Columns holding a row's own structured output, by kind, e.g. {json_schema: schema}: a JSON schema "
        "(an object, or JSON text), a regex, a list of choices (or JSON text of one), a grammar; a row sets at most one.",
    )
    reference_column: str | None = Field(None, description="Column with a reference answer, kept for scoring.")
    max_line_bytes: int = Field(
        16 << 20, ge=1, description="Longest JSONL line read (bytes); a longer one is a rejected row, never read whole."
    )
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)

    def row_sampling_columns(self) -> list[str]:
        """The columns a row's own sampling comes from besides override_columns: each may be null or missing."""
        return [c for c in (self.sampling_column, *(self.structured_columns or {}).values()) if c]

    @field_serializer("source", when_used="json")
    def _source_without_credentials(self, source: str) -> str:
        """What a flow run's parameters, the store and the logs get (they are all written as JSON)."""
        return redact(source)

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
        spec = read_yaml(cls, path, "dataset spec")
        if "://" not in spec.source and not Path(spec.source).is_absolute():
            spec.source = str(path.parent / spec.source)
        return spec


def read_yaml(model: type[ConfigT], path: Path, what: str) -> ConfigT:
    """A configuration from a YAML file; a mistake names the file and the field."""
    if not path.is_file():
        raise SpecError(f"{what} {path}: file not found")
    try:
        return model.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as error:
        raise SpecError(f"{what} {path}: not valid YAML ({error})") from error
    except ValidationError as error:
        raise SpecError(f"{what} {path}: {describe_errors(error)}") from error


class LoraAdapter(BaseModel):
    """A LoRA adapter applied to every request of a run (the engine needs enable_lora)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str = Field(description="Local adapter folder (PEFT layout: adapter_config.json + weights).")


# ModelConfig fields passed to vllm.LLM under their own names.
VLLM_ARGUMENTS = {
    "revision",
    "dtype",
    "max_model_len",
    "gpu_memory_utilization",
    "max_num_seqs",
    "tensor_parallel_size",
    "enable_prefix_caching",
    "quantization",
    "kv_cache_dtype",
    "enforce_eager",
    "seed",
    "enable_lora",
    "speculative_config",
}


class ModelConfig(BaseModel):
    """The model, the engine that serves it, and the engine arguments passed through to vLLM."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(".cache/models/tiny-llama", description="Local model folder, or the served model name.")
    revision: str | None = None
    engine: Literal["vllm", "openai"] = Field(
        "vllm", description="vllm: in-process vllm.LLM; openai: any OpenAI-compatible server at base_url."
    )
    mode: Mode = Field("chat", description="chat: apply the model's chat template; completion: send the prompt as is.")
    # vllm.LLM engine arguments
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="On the CPU build: the share of system RAM kept for the KV cache."
    )
    max_num_seqs: int | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool | None = None
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    seed: int = 0
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 1
    speculative_config: dict[str, Any] | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Other vllm.LLM arguments.")
    step_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="vllm: an engine step that takes longer is a hang: the engine is restarted (twice in a row: the run fails).",
    )
    engine_restarts: int = Field(
        3,
        ge=0,
        description="vllm: engine deaths in a row (no request finished in between) that are restarted before the run fails.",
    )
    lora_adapter: LoraAdapter | None = None
    reasoning_parser: str | None = Field(
        None,
        exclude_if=unset,
        description="vLLM's reasoning parser by name (deepseek_r1, qwen3, ...): each answer's thinking goes to `reasoning`, "
        "the final answer to `text`, with the tokens of each. openai engine: what the server splits (vllm serve --reasoning-parser).",
    )
    # openai engine
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1 (openai engine).")
    api_key_secret: str | None = Field(None, description="Name of the Prefect Secret block holding the API key.")
    max_concurrency: int = Field(32, ge=1, description="Requests in flight at once (openai engine).")
    request_timeout_seconds: float = Field(600.0, gt=0)
    max_retries: int = Field(5, ge=0, description="Per request, on 429, 5xx and timeouts (openai engine).")

    @field_serializer("base_url", when_used="json")
    def _base_url_without_credentials(self, base_url: str | None) -> str | None:
        """The key belongs in the Secret block of api_key_secret; one put in the URL is not recorded."""
        return None if base_url is None else redact(base_url)

    @field_serializer("engine_kwargs", when_used="json")
    def _engine_kwargs_without_secrets(self, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
        """A token among the engine arguments (hf_token) is not recorded: it belongs in the worker's environment."""
        return redact_options(engine_kwargs)

    @field_validator("reasoning_parser")
    @classmethod
    def _known_parser(cls, name: str | None) -> str | None:
        if name is not None:
            from tasks.engines.installed import check_reasoning_parser

            check_reasoning_parser(name)
        return name

    @model_validator(mode="after")
    def _engine_needs(self) -> ModelConfig:
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine 'openai' needs base_url")
        if self.lora_adapter and self.engine == "vllm" and not self.enable_lora:
            self.enable_lora = True
        return self

    def vllm_args(self) -> dict[str, Any]:
        """The vllm.LLM arguments: two configs with equal args share one engine."""
        args = self.model_dump(include=VLLM_ARGUMENTS)
        if self.enable_lora:
            args.update(max_lora_rank=self.max_lora_rank, max_loras=self.max_loras)
        return {"model": self.model, **args, **self.engine_kwargs}


class StructuredOutput(BaseModel):
    """Constrain every answer: exactly one of a JSON schema, any JSON object, a regex, a list of choices or a grammar."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | None = None
    json_object: Literal[True] | None = Field(None, exclude_if=unset, description="Any JSON object (OpenAI's json_object).")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, exclude_if=unset, description="A grammar in vLLM's formats (EBNF/GBNF or Lark).")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutput:
        if sum(x is not None for x in (self.json_schema, self.json_object, self.regex, self.choice, self.grammar)) != 1:
            raise ValueError("set exactly one of json_schema, json_object, regex, choice or grammar")
        return self


# OpenAI's range for a token's logit bias.
LogitBias = dict[int, Annotated[float, Field(ge=-100, le=100)]]


def keeps_a_token(value: int) -> int:
    if value == 0:
        raise ValueError("0 would keep no prompt token (-1: as many as the context holds)")
    return value


TruncatePrompt = Annotated[int, Field(ge=-1), AfterValidator(keeps_a_token)]

# Arguments of the chat template's call that the engine sets itself (vLLM refuses chat_template and
# tokenize among a request's chat_template_kwargs; the others would clash with the engine's own).
ENGINE_TEMPLATE_ARGUMENTS = ("conversation", "messages", "chat_template", "tokenize", "add_generation_prompt", "return_dict")


def template_variables(kwargs: dict[str, Any]) -> dict[str, Any]:
    if taken := [name for name in kwargs if name in ENGINE_TEMPLATE_ARGUMENTS]:
        raise ValueError(f"{taken[0]!r} is set by the engine, not through chat_template_kwargs")
    return kwargs


TemplateKwargs = Annotated[dict[str, Any], AfterValidator(template_variables)]


class SamplingConfig(BaseModel):
    """vLLM sampling parameters for every request of a run (a row may override some of them)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, description="0 or -1: no top-k.")
    min_p: float = Field(0.0, ge=0, le=1)
    max_tokens: int = Field(64, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(0, description="Per-request seed: sampled outputs reproduce across runs.")
    n: int = Field(1, ge=1, description="Samples per request (sample_index 0..n-1).")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = Field(1.0, gt=0)
    logprobs: int | None = Field(
        None,
        ge=0,
        description="Ask for logprobs: outputs then carry mean_logprob and token_logprobs (each token and this many alternatives).",
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, exclude_if=unset, description="Ask for the prompt's logprobs (this many alternatives): prompt_logprobs."
    )
    logit_bias: LogitBias | None = Field(None, exclude_if=unset, description="Token id → bias added to its logit.")
    min_tokens: int | None = Field(
        None, ge=0, exclude_if=unset, description="Tokens generated before EOS or a stop token may end the answer."
    )
    ignore_eos: bool | None = Field(None, exclude_if=unset, description="Go on past EOS, until max_tokens or a stop.")
    stop_token_ids: list[int] | None = Field(None, exclude_if=unset, description="Token ids that end the answer, besides EOS.")
    bad_words: list[str] | None = Field(
        None, exclude_if=unset, description="Words never generated (as the tokens they encode to)."
    )
    skip_special_tokens: bool | None = Field(
        None, exclude_if=unset, description="false: special tokens stay in the text (vLLM's default: true)."
    )
    truncate_prompt_tokens: TruncatePrompt | None = Field(
        None,
        exclude_if=unset,
        description="Keep only this many prompt tokens (-1: as many as the context holds), from the end the tokenizer's "
        "truncation_side names (vLLM's rule).",
    )
    extra: dict[str, Any] | None = Field(
        None,
        exclude_if=unset,
        description="Any other vllm.SamplingParams field by its name, e.g. {include_stop_str_in_output: true}; checked "
        "against the installed vLLM before anything runs. openai engine: sent in the request body.",
    )
    max_tokens_wins: bool | None = Field(
        None, exclude_if=unset, description="The run's max_tokens replaces a row's own (the larger budget of `vbf rerun`)."
    )
    chat_template_kwargs: TemplateKwargs | None = Field(
        None,
        exclude_if=unset,
        description="Chat requests: more variables for the model's chat template, e.g. {enable_thinking: false} for a "
        "reasoning model (vLLM's LLM.chat(chat_template_kwargs=...); openai engine: the body field vllm serve reads). "
        "A row's add to the run's. A reasoning parser is given them too, as vllm serve gives them.",
    )
    structured: StructuredOutput | None = None

    @field_validator("extra")
    @classmethod
    def _extra_fields_exist(cls, extra: dict[str, Any] | None) -> dict[str, Any] | None:
        return checked_extra(extra, set(cls.model_fields))


def checked_extra(extra: dict[str, Any] | None, named: set[str]) -> dict[str, Any] | None:
    if extra:
        from tasks.engines.installed import check_extra_fields

        check_extra_fields(extra, named)
    return extra


class SamplingOverrides(BaseModel):
    """Sampling parameters one request may set for itself (a dataset column, an OpenAI batch body)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    logprobs: int | None = Field(None, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0)
    logit_bias: LogitBias | None = None
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool | None = None
    truncate_prompt_tokens: TruncatePrompt | None = None
    extra: dict[str, Any] | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    structured: StructuredOutput | None = None

    @field_validator("extra")
    @classmethod
    def _extra_fields_exist(cls, extra: dict[str, Any] | None) -> dict[str, Any] | None:
        return checked_extra(extra, set(SamplingConfig.model_fields))

    @model_validator(mode="before")
    @classmethod
    def _openai_names(cls, data: Any) -> Any:
        """OpenAI's spellings: max_completion_tokens, and stop as one string."""
        if isinstance(data, dict):
            data = dict(data)
            if "max_completion_tokens" in data:
                data.setdefault("max_tokens", data.pop("max_completion_tokens"))
            if isinstance(data.get("stop"), str):
                data["stop"] = [data["stop"]]
        return data


class RerunConfig(BaseModel):
    """Which answers of an earlier run a rerun asks again (`vbf rerun`): the others keep their first answer."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The run whose cut-off answers are asked again.")
    cut_off: Literal["reasoning", "length"] = Field(
        "reasoning",
        description="reasoning: answers whose budget ran out inside the thinking (reasoning_truncated); "
        "length: every answer that stopped at max_tokens.",
    )


class StoreConfig(BaseModel):
    """Where results go: the DuckDB file and the folder (or fsspec URL) for shard files and cache."""

    model_config = ConfigDict(extra="forbid")

    duckdb_path: str = "results/results.duckdb"
    storage: str = Field("results/storage", description="Shard files and cached task results.")
    lock_timeout_seconds: float = Field(
        60.0, ge=0, description="How long a commit waits while another process holds the DuckDB file."
    )
    condition_timeout_seconds: float = Field(
        60.0, gt=0, description="How long a user's `where` (curation selection, export filter) may run before it is stopped."
    )


class ShardingConfig(BaseModel):
    """How the work is cut into inference tasks, and how a failed task is retried."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(
        1024, ge=1, description="Most unique requests per shard: one inference task and one generate call each."
    )
    max_shard_tokens: int | None = Field(
        None, ge=1, description="Most approximate prompt tokens (characters / 4) per shard; unset: no budget."
    )
    group_prefixes: bool = Field(
        True, description="Order requests by their text so prompts sharing a prefix land in one shard (prefix cache)."
    )
    shards_in_flight: int = Field(
        3,
        ge=1,
        description="Shards read, tokenized and queued ahead of the engine at once; the rest wait unread, so memory "
        "stays flat however large the dataset.",
    )
    part_size: int = Field(
        256,
        ge=1,
        description="Requests per journal part: each finished part is kept at once, so a killed run computes again "
        "at most the parts that were in the engine.",
    )
    on_stop: Literal["finish", "abort"] = Field(
        "finish",
        description="On Ctrl-C, SIGTERM or a cancel: let the shards in flight finish (and commit them), or abort them "
        "(their finished parts are kept for the next run).",
    )
    retries: int = Field(3, ge=0, description="Retries of a shard after a transient failure (engine crash, out of memory).")
    retry_delay_seconds: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0])
    gpu_limit: str | None = Field(
        None,
        description="Prefect global concurrency limit a shard holds while it loads and runs the engine "
        "(slots = GPUs; a shard takes tensor_parallel_size). None: no guard (one process, one engine).",
    )


class WorkersConfig(BaseModel):
    """How dispatch='workers' runs shard groups as runs of the shard-worker deployment."""

    model_config = ConfigDict(extra="forbid")

    deployment: str = Field("generate-shards/generate-shards", description="flow name/deployment name")
    devices: list[str] = Field(
        default_factory=list,
        description="CUDA_VISIBLE_DEVICES of each group, e.g. ['0', '1'] (cycled); empty: the worker's own.",
    )
    group_retries: int = Field(2, ge=0, description="New flow runs for a group that failed; its finished shards stay cached.")
    poll_seconds: float = Field(2.0, gt=0, description="How often the run checks its groups.")


class PricingConfig(BaseModel):
    """A dry run's rate: per GPU-hour of engine time, or per million tokens (prompt + output)."""

    model_config = ConfigDict(extra="forbid")

    per_gpu_hour: float | None = Field(None, ge=0)
    per_million_tokens: float | None = Field(None, ge=0)


class MetricsConfig(BaseModel):
    """How a run is watched from outside: Prometheus metrics served over HTTP by the process that runs
    it (off unless a port is set), and a progress file rewritten every second (off unless a path is set)."""

    model_config = ConfigDict(extra="forbid")

    port: int | None = Field(
        None, ge=0, le=65535, description="Serve /metrics on this port while the run goes (0: any free port); unset: off."
    )
    host: str = Field("127.0.0.1", description="The address to listen on; 0.0.0.0 for a Prometheus on another machine.")
    final_scrape_seconds: float = Field(
        30.0,
        ge=0,
        description="After the run, keep serving until a scrape has read its final counts, at most this long "
        "(only when something scraped during the run).",
    )
    progress_file: str | None = Field(
        None,
        description="Rewrite this JSON file with the run's live progress (requests, tokens/s, ETA) every second "
        "while it goes: `vbf serve`'s page reads it; unset: none.",
    )


def openai_batch_dataset(path: str, name: str) -> DatasetSpec:
    """An OpenAI batch file as a dataset: every line gets an answer or an error line, however many are rejected."""
    return DatasetSpec(name=name, source=path, format="openai_batch", validation=ValidationConfig(max_rejected_share=1.0))


class ServiceConfig(BaseModel):
    """`vbf serve`: the OpenAI Batch API over the pipeline."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    folder: str = Field(
        "results/service", description="Local folder for uploaded and produced files, each batch's run, and the API's records."
    )
    models: dict[str, ModelConfig] = Field(
        default_factory=dict, description="Served name → model; empty: the bundled tiny model as `tiny-llama`."
    )
    store: StoreConfig = Field(default_factory=StoreConfig)
    max_file_bytes: int = Field(200 * 2**20, ge=1, description="Largest upload (OpenAI's limit for batch files: 200 MB).")
    max_line_bytes: int = Field(1 * 2**20, ge=1, description="Longest line of an upload.")
    max_lines: int = Field(1_000_000, ge=1, description="Most lines in a batch file.")
    running_batches: int = Field(1, ge=1, description="Batches run at once (each in its own process, one engine each).")
    run_attempts: int = Field(
        3, ge=1, description="Runs of a batch whose process dies before it ends (each goes on from the last)."
    )
    deployment: str | None = Field(
        None,
        description="Run each batch as a flow run of this deployment ('flow/deployment', on a Prefect server's gpu pool); "
        "unset: as a process of the server's own.",
    )
    poll_seconds: float = Field(1.0, gt=0, description="How often batches are checked (started, stopped, ended).")
    counts_seconds: float = Field(
        3.0, gt=0, description="How often a running batch's request counts are read from the results file."
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig,
        description="Each batch's run serves its Prometheus metrics on this port (docs/monitoring.md): one batch at a time then.",
    )

    @model_validator(mode="after")
    def _one_run_per_metrics_port(self) -> ServiceConfig:
        if self.metrics.port and self.running_batches > 1:
            raise ValueError("a metrics port serves one run at a time: running_batches must be 1 with metrics.port")
        return self


class SampleSelection(BaseModel):
    """Which outputs of a run go to human review, and how they are chosen."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The run whose outputs are reviewed.")
    strategy: Literal["lowest", "stratified", "disagreement", "where"] = Field(
        "lowest",
        description="lowest: lowest `scorer` values first; stratified: equal draws from equal-width buckets "
        "of `scorer`; disagreement: requests whose answers differ between run_id and other_run_id (both "
        "answers are pushed); where: a SQL condition over the candidate columns.",
    )
    scorer: str = Field("completion_tokens", description="Score that orders or buckets the samples.")
    limit: int = Field(50, ge=1, description="Samples to push (disagreement: pairs).")
    buckets: int = Field(5, ge=1, description="stratified: number of score buckets.")
    seed: int = Field(0, description="stratified: seed of the draw inside each bucket.")
    other_run_id: str | None = Field(None, description="disagreement: the run to compare with.")
    where: str | None = Field(
        None,
        description="where: e.g. \"scores['empty_output'] = 1 OR completion_tokens < 4\". Columns: run_id, "
        "custom_id, output_id, prompt, response, finish_reason, completion_tokens, scores (map scorer → value).",
    )

    @model_validator(mode="after")
    def _strategy_inputs(self) -> SampleSelection:
        if self.strategy == "disagreement" and not self.other_run_id:
            raise ValueError("strategy 'disagreement' needs other_run_id")
        if self.strategy == "where" and not (self.where or "").strip():
            raise ValueError("strategy 'where' needs a where condition")
        return self


# The embedded defaults: the bundled sample on the tiny CPU model that scripts/build_tiny_model.py builds.
SAMPLE_DATASET = DatasetSpec(
    name="sample",
    source="datasets/sample/prompts.parquet",
    id_column="id",
    prompt_column="prompt",
    system_prompt="You are a helpful assistant.",
)
# Eager: compiling the tiny model cost ~15 s of each engine start, more than the sample's whole generation
# (bench/engine_start.py compares the two; on a real model and a GPU, compiling pays).
TINY_CPU_MODEL = ModelConfig(
    model=".cache/models/tiny-llama", max_model_len=1024, gpu_memory_utilization=0.15, enforce_eager=True
)
