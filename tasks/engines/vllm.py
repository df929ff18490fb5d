"""The in-process vLLM engine (`engine: vllm`): built once per process, reused by every shard, driven
by one loop thread (see `loop`). The same code runs vLLM's GPU build and its CPU build."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from tasks import console
from tasks.config import ModelConfig, SamplingConfig, SpecError
from tasks.engines.base import (
    EngineFailed,
    GenerateResult,
    OutputRecord,
    TokenLogprob,
    output_table,
    prompt_token_ids,
    request_columns,
    request_sampling,
)
from tasks.engines.faults import (
    EngineHung,
    EngineOutput,
    Watchdog,
    engine_processes,
    ensure_reaper,
    kill_processes,
    limits_file,
    lowered,
    save_limits,
    saved_limits,
)
from tasks.engines.loop import EngineCounts, EngineLoop, PendingRequest, Submission, request_counters
from tasks.engines.reasoning import reasoning_parser, split_answer

logger = logging.getLogger(__name__)


def engine_arguments(config: ModelConfig) -> dict:
    from vllm.platforms import current_platform

    # Stats on: vLLM then times each request (queued → last token), which outputs record.
    args = {"disable_log_stats": False, **config.vllm_args()}
    if current_platform.is_cpu():
        # Chunked prefill rewinds a request's seeded generator, which CPU generators cannot do:
        # seeded sampling (temperature > 0 with a seed) would kill the engine
        # ("CPU Generator does not use offset"). engine_kwargs can still turn it back on.
        args.setdefault("enable_chunked_prefill", False)
    return args


# SamplingConfig fields that are no SamplingParams field: the prompt's truncation and its chat template
# are done here, before the engine (it takes token ids), and the others shape the configuration itself.
NOT_SAMPLING_PARAMS = {
    "max_tokens",
    "stop",
    "structured",
    "truncate_prompt_tokens",
    "extra",
    "max_tokens_wins",
    "chat_template_kwargs",
}


def vllm_sampling_params(sampling: SamplingConfig, max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if sampling.structured is not None:
        s = sampling.structured
        structured = StructuredOutputsParams(
            json=s.json_schema, json_object=s.json_object, regex=s.regex, choice=s.choice, grammar=s.grammar
        )
    # SamplingConfig's field names are vLLM's own; unset ones are left to vLLM's defaults
    return SamplingParams(
        **sampling.model_dump(exclude=NOT_SAMPLING_PARAMS),
        **(sampling.extra or {}),
        max_tokens=max_tokens,
        stop=sampling.stop or None,
        structured_outputs=structured,
    )


def truncated_prompt(token_ids: list[int], keep: int | None, context: int, side: str | None) -> list[int]:
    """The prompt cut to `keep` tokens as vLLM cuts it: -1 is the context less one token for the answer,
    and the tokenizer's truncation_side says which end stays (left: the last tokens)."""
    if keep is None:
        return token_ids
    keep = context - 1 if keep < 0 else keep
    if len(token_ids) <= keep:
        return token_ids
    return token_ids[-keep:] if side == "left" else token_ids[:keep]


class VllmEngine:
    """vllm.LLM with its loop, restarted when its engine processes die or hang (see `restart`)."""

    def __init__(self, config: ModelConfig, limits_path: str | None = None):
        self.config = config
        self.limits_path = limits_path  # where lowered batch limits are kept for these engine args
        self.limits = saved_limits(limits_path, config)  # what an earlier out-of-memory left, if anything
        self.output = EngineOutput()
        self.llm = self.build()
        self.loop = EngineLoop(self.llm, admit_below=2 * self.max_num_seqs, restart=self.restart)
        self.watchdog = Watchdog(self.loop, config.step_timeout_seconds)
        self.deaths: list[str] = []  # the causes of the engine's deaths in a row (see restart)
        self.settled_at_death = 0
        # prepare() tokenizes in shard threads while generate() detokenizes: each gets its own copy
        self.tokenizer = copy.deepcopy(self.llm.get_tokenizer())
        self.prepare_lock = threading.Lock()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.start_reported = False
        self.parsers: dict[tuple[str, str], object] = {}  # reasoning parsers by name and template variables, built on first use

    def build(self):
        LLM = import_vllm().LLM  # noqa: N806

        ensure_reaper()
        with self.output.capture():  # the engine's processes start with our output piped through
            llm = LLM(**{**engine_arguments(self.config), **self.limits})
        console.route_library_logs()  # vLLM configures its logging as the engine starts
        self.processes = engine_processes(llm)
        scheduler = llm.llm_engine.vllm_config.scheduler_config
        logger.info(
            "vLLM engine ready: engine core pid %s, max_num_seqs %d, max_num_batched_tokens %d",
            self.processes[0].pid if self.processes else "?",
            scheduler.max_num_seqs,
            scheduler.max_num_batched_tokens,
        )
        return llm

    def restart(self, error: BaseException):
        """A new engine in place of one that died or hung, or None when `error` is no engine death.

        Deaths are "in a row" until the engine gets through two full batches between them.
        Killed or crashed: the same settings, at most `engine_restarts` times in a row. Out of
        memory: half max_num_seqs and max_num_batched_tokens, down to a floor, persisted. Hung twice
        in a row, or out of memory at the floor: EngineFailed, naming why.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        if not isinstance(error, EngineDeadError | EngineHung):
            return None
        if self.loop.settled - self.settled_at_death >= self.loop.admit_below:
            self.deaths = []  # the engine got through two full batches since its last death: this one is not "in a row"
        self.settled_at_death = self.loop.settled
        kill_processes(self.processes)  # a dead core's workers, a hung core; vLLM's own clean-up may lag
        hung = self.watchdog.hung is self.llm
        cause = (
            f"hung: no engine step returned within step_timeout_seconds={self.watchdog.timeout:g}" if hung else self.death_cause()
        )
        logger.warning("vLLM engine %s; restarting it", cause)
        if hung and "hung" in self.deaths:
            raise EngineFailed(f"the vLLM engine hung again after a restart: {cause}")
        if cause == "ran out of memory":
            self.lower_limits(error)
        elif len(self.deaths) >= self.config.engine_restarts:
            raise EngineFailed(
                f"the vLLM engine died {len(self.deaths) + 1} times in a row "
                f"(engine_restarts={self.config.engine_restarts}); last: {cause}"
            )
        self.deaths.append("hung" if hung else cause)
        with contextlib.suppress(Exception):  # already dead: only its client's sockets and threads are left
            self.llm.llm_engine.engine_core.shutdown(timeout=0)
        _status.state = "restarting"
        self.llm = self.build()
        _status.state = "ready"
        self.loop.admit_below = 2 * self.max_num_seqs
        return self.llm

    def death_cause(self) -> str:
        if self.output.mentions_out_of_memory():
            return "ran out of memory"
        codes = [p.exitcode for p in getattr(self.llm.llm_engine.engine_core.resources.engine_manager, "processes", [])]
        return f"died (exit codes {codes}): {self.output.last_error()}"

    def lower_limits(self, error: BaseException) -> None:
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        now = {"max_num_seqs": scheduler.max_num_seqs, "max_num_batched_tokens": scheduler.max_num_batched_tokens}
        # without chunked prefill vLLM needs a whole prompt in one batch
        floor = self.max_model_len if not scheduler.enable_chunked_prefill else min(self.max_model_len, 2048)
        smaller = lowered(now, floor)
        if smaller == now:
            raise EngineFailed(
                f"the vLLM engine ran out of memory at max_num_seqs={now['max_num_seqs']} and "
                f"max_num_batched_tokens={now['max_num_batched_tokens']}, the lowest it goes: {self.output.last_error()}"
            ) from error
        self.limits = smaller
        save_limits(self.limits_path, self.config, smaller, f"out of memory at {now}: {self.output.last_error()}")

    @property
    def requests_sent(self) -> int:
        """How many requests reached the engine in this process (resent ones included)."""
        return self.loop.sent

    def take_start_report(self) -> bool:
        """True for the first shard to use the engine: it reports how long it waited for the start."""
        reported, self.start_reported = self.start_reported, True
        return not reported

    def prompt_token_ids(self, prompt: str | None, messages: str | None, chat_template_kwargs: dict | None = None) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt, messages, chat_template_kwargs)

    def lora_request(self):
        adapter = self.config.lora_adapter
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.name, zlib.crc32(adapter.name.encode()) % 1_000_000 + 1, adapter.path)

    def prepare(self, shard: pa.Table, sampling: SamplingConfig) -> tuple[list[PendingRequest], list[OutputRecord]]:
        """Requests ready for the engine, and error records for those that cannot run on their own."""
        with self.prepare_lock:
            pending: list[PendingRequest] = []
            errors: list[OutputRecord] = []
            for request_key, prompt, messages, override in request_columns(shard):
                try:
                    request = request_sampling(sampling, override)
                except ValueError as error:
                    errors.append(OutputRecord.failed(request_key, "invalid_request", str(error)))
                    continue
                try:
                    token_ids = self.prompt_token_ids(prompt, messages, request.chat_template_kwargs)
                except Exception as error:  # a chat template that rejects these messages, say
                    errors.append(OutputRecord.failed(request_key, "invalid_prompt", f"{type(error).__name__}: {error}"))
                    continue
                side = getattr(self.tokenizer, "truncation_side", None)
                token_ids = truncated_prompt(token_ids, request.truncate_prompt_tokens, self.max_model_len, side)
                if len(token_ids) >= self.max_model_len:
                    message = f"prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len}"
                    errors.append(OutputRecord.failed(request_key, "context_length_exceeded", message, len(token_ids)))
                    continue
                pending.append(PendingRequest(request_key, token_ids, request))
            request_counters.failed += len(errors)  # they never reach the loop, which counts the others
            return pending, errors

    def generate(self, shard: pa.Table, sampling: SamplingConfig, reasoning_parser: str | None = None) -> pa.Table:
        """The shard's outputs, one submission to the engine loop.

        A request that cannot run on its own (prompt longer than the context, a bad per-row
        override or schema) becomes an error row, like the error file of an OpenAI batch.
        """
        pending, errors = self.prepare(shard, sampling)
        return self.generate_prepared(pending, errors, sampling, reasoning_parser)[0]

    def generate_prepared(
        self,
        pending: list[PendingRequest],
        errors: list[OutputRecord],
        sampling: SamplingConfig,
        reasoning_parser: str | None = None,
    ) -> tuple[pa.Table, float]:
        """The outputs, and the engine seconds they took."""
        shared_sampling = all(r.sampling is sampling for r in pending)
        records, seconds = self.run(pending, shared_sampling, reasoning_parser)
        return output_table([*errors, *records]), seconds

    def sampling_params(self, pending: list[PendingRequest]) -> list:
        """The SamplingParams each request is sent with, or the error that keeps it from being sent.

        One per distinct (sampling, max_tokens), as LLM.generate shares one: vLLM copies it per
        request anyway, and building one per request cost ~10 us of the loop's core each.
        """
        from vllm.exceptions import VLLMClientError

        shared: dict[tuple[int, int], object] = {}
        params = []
        for r in pending:
            max_tokens = min(r.sampling.max_tokens, self.max_model_len - len(r.token_ids))
            key = (id(r.sampling), max_tokens)
            if key not in shared:
                try:
                    shared[key] = vllm_sampling_params(r.sampling, max_tokens)
                except (ValueError, TypeError, VLLMClientError) as error:  # vLLM's checks: min_tokens above max_tokens, say
                    shared[key] = ValueError(f"sampling parameters rejected by vLLM: {error}")
            params.append(shared[key])
        return params

    def run(
        self, pending: list[PendingRequest], shared_sampling: bool = False, reasoning_parser: str | None = None
    ) -> tuple[list[OutputRecord], float]:
        """Records for these requests, and the engine seconds they took."""
        # built before anything is sent: a parser that does not fit the tokenizer fails the shard at once
        parsers = [
            self.reasoning_parser(reasoning_parser, r.sampling.chat_template_kwargs) if reasoning_parser else None
            for r in pending
        ]
        params = self.sampling_params(pending)
        rejected = {i: p for i, p in enumerate(params) if isinstance(p, Exception)}
        if rejected and shared_sampling:  # the run's own sampling: its configuration is at fault
            raise SpecError(str(next(iter(rejected.values()))))
        sent = [i for i in range(len(pending)) if i not in rejected]
        outcomes: dict[int, object] = dict(rejected)
        seconds = 0.0
        if sent:
            submission = Submission([pending[i] for i in sent], [params[i] for i in sent], self.lora_request(), shared_sampling)
            outcomes.update(zip(sent, self.loop.submit(submission).wait()))
            seconds = submission.engine_seconds
        records = []
        for index, request in enumerate(pending):
            outcome = outcomes[index]
            if isinstance(outcome, Exception):  # vLLM rejected this request on its own (its override, its schema)
                records.append(OutputRecord.failed(request.request_key, "invalid_request", str(outcome), len(request.token_ids)))
                continue
            records.extend(completion_records(request, outcome, parsers[index]))
        return records, seconds

    def reasoning_parser(self, name: str, chat_template_kwargs: dict | None = None):
        """vLLM's reasoning parser `name` on this engine's tokenizer, given the request's chat template
        variables as vllm serve gives them (a parser may read enable_thinking); built once per both."""
        key = (name, json.dumps(chat_template_kwargs, sort_keys=True, default=str))
        if key not in self.parsers:
            self.parsers[key] = reasoning_parser(name, self.tokenizer, chat_template_kwargs)
        return self.parsers[key]

    @property
    def max_num_seqs(self) -> int:
        return self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs

    def close(self, timeout: float | None = None) -> None:
        self.watchdog.stop()
        self.loop.stop()  # from here on a shard's submission raises EngineRestarted
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown(timeout=timeout)
        del self.llm


def completion_records(request: PendingRequest, outcome, parser=None) -> list[OutputRecord]:
    """One record per sample of a finished vLLM RequestOutput; with a reasoning parser, its thinking apart."""
    stats = outcome.metrics
    latency = stats.last_token_ts - stats.queued_ts if stats is not None and stats.last_token_ts else None
    asked = request.sampling
    prompt_logprobs = None
    if asked.prompt_logprobs is not None and outcome.prompt_logprobs is not None:
        prompt_logprobs = token_logprobs(request.token_ids, outcome.prompt_logprobs, asked.prompt_logprobs)
    records = []
    for completion in outcome.outputs:
        tokens = len(completion.token_ids)
        mean_logprob = None
        if asked.logprobs is not None and completion.cumulative_logprob is not None and tokens:
            mean_logprob = completion.cumulative_logprob / tokens
        split = split_answer(parser, completion.text, completion.token_ids, completion.finish_reason) if parser else None
        records.append(
            OutputRecord(
                request.request_key,
                sample_index=completion.index,
                text=split.text if split else completion.text,
                finish_reason=completion.finish_reason,
                prompt_tokens=len(request.token_ids),
                completion_tokens=tokens,
                mean_logprob=mean_logprob,
                latency_seconds=latency,
                token_logprobs=(
                    token_logprobs(completion.token_ids, completion.logprobs, asked.logprobs)
                    if asked.logprobs is not None and completion.logprobs is not None
                    else None
                ),
                prompt_logprobs=prompt_logprobs,
                reasoning=split.reasoning if split else None,
                reasoning_tokens=split.reasoning_tokens if split else None,
                text_tokens=split.text_tokens if split else None,
                reasoning_truncated=split.truncated if split else None,
            )
        )
    return records


def token_logprobs(token_ids, positions, top: int) -> list[TokenLogprob]:
    """Each token with its logprob and the `top` most likely tokens at its place, rank 1 first.

    vLLM gives per place the chosen token and the top ranks (the chosen one also among them when it
    ranks there); a prompt's first place has nothing before it: None, stored with a null logprob.
    """
    entries: list[TokenLogprob] = []
    for token_id, place in zip(token_ids, positions):
        if place is None:
            entries.append({"token": None, "token_id": token_id, "logprob": None, "top": []})
            continue
        chosen = place[token_id]
        ranked = sorted((p.rank, i, p) for i, p in place.items() if p.rank is not None and p.rank <= top)
        entries.append(
            {
                "token": chosen.decoded_token,
                "token_id": token_id,
                "logprob": chosen.logprob,
                "top": [{"token": p.decoded_token, "token_id": i, "logprob": p.logprob} for _, i, p in ranked],
            }
        )
    return entries


# ---------------------------------------------------------------- the process's one engine

_engine_lock = threading.Lock()
_engine: VllmEngine | None = None

EngineState = Literal["stopped", "loading", "ready", "restarting"]
ENGINE_STATES: tuple[EngineState, ...] = ("stopped", "loading", "ready", "restarting")


class _Status:
    state: EngineState = "stopped"  # the process's engine: none, being built, serving, or being rebuilt after a death


_status = _Status()


@dataclass(frozen=True)
class EngineStatus:
    """The process's engine now: its state and, while it serves, vLLM's own scheduler statistics."""

    state: EngineState
    running: float | None = None  # requests in vLLM's running batch
    waiting: float | None = None  # requests vLLM holds but has not scheduled
    kv_cache_usage: float | None = None  # share of the KV cache in use, 0 to 1


VLLM_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}


def engine_status() -> EngineStatus:
    """The state, and vLLM's gauges summed over its engine cores. vLLM keeps them in prometheus_client's
    registry for its stats loggers; only these three are collected (`LLM.get_metrics()` collects every
    histogram too: ~10 ms of the GIL, taken from the engine loop at every scrape). Nothing is asked of the engine."""
    engine, state = _engine, _status.state
    if engine is None or state != "ready":
        return EngineStatus(state)
    from prometheus_client import REGISTRY

    values: dict[str, float] = {}
    for metric in REGISTRY.restricted_registry(VLLM_GAUGES).collect():
        for sample in metric.samples:
            if sample.name in VLLM_GAUGES:
                field = VLLM_GAUGES[sample.name]
                values[field] = values.get(field, 0.0) + sample.value
    return EngineStatus(state, **values)


def engine_counts() -> EngineCounts:
    """What the process's engine has finished so far (every run of the process), how many requests it holds now,
    and whether it is being built."""
    engine = _engine
    running = len(engine.loop.owner) if engine is not None else 0
    return request_counters.read(running, starting=_status.state in ("loading", "restarting"))


def get_engine(config: ModelConfig, storage: str | None = None) -> VllmEngine:
    """The process's engine for these engine args; other args replace (and free) the previous engine.

    `storage` is the result storage: an engine started for it begins from the batch limits an
    out-of-memory left there, and leaves there the limits it had to lower.
    """
    global _engine
    with _engine_lock:
        if _engine is not None and _engine.config.vllm_args() != config.vllm_args():
            _close_engine()
        if _engine is None:
            _status.state = "loading"
            try:
                _engine = VllmEngine(config, limits_file(storage) if storage else None)
            finally:
                _status.state = "ready" if _engine is not None else "stopped"
        elif _engine.config != config:
            _engine.config = config  # same engine; the adapter (or other per-run settings) may differ
        if _engine.limits_path is None and storage:
            _engine.limits_path = limits_file(storage)
        return _engine


def import_vllm():
    """vLLM, imported (once) with what it prints on import and its log lines sent where the console says."""
    with console.output_to_log():
        import vllm
    console.route_library_logs()
    return vllm


def start_engine_in_background(config: ModelConfig, storage: str | None = None) -> None:
    """Start loading the engine in a thread, so its start overlaps the work before the first shard.

    A load that fails is left to the shard that needs the engine to raise, in its own context.
    vLLM is imported here, in the caller's thread: imported in the thread, beside whatever the
    caller goes on with, the import (seconds: torch, transformers) shares one GIL and takes longer.
    """
    import_vllm()

    def load() -> None:
        with contextlib.suppress(Exception):  # the first shard loads again and reports the error
            get_engine(config, storage)

    threading.Thread(target=load, name="engine-start", daemon=True).start()


def close_engine(timeout: float | None = None) -> None:
    """Stop the engine's processes now rather than at interpreter exit (timeout=0: kill them, nothing to drain)."""
    with _engine_lock:
        _close_engine(timeout)


def _close_engine(timeout: float | None = None) -> None:
    global _engine
    if _engine is not None:
        _engine.close(timeout)
        _engine = None
        _status.state = "stopped"
        gc.collect()


class SharedVllmEngine:
    """The Engine for `engine: vllm`: shards of this process run on its one VllmEngine."""

    def __init__(self, config: ModelConfig, api_key: str | None = None, storage: str | None = None):
        self.config, self.storage = config, storage

    def generate(self, requests: pa.Table, sampling: SamplingConfig, key: str) -> GenerateResult:
        asked = time.perf_counter()
        engine = get_engine(self.config, self.storage)
        waited = time.perf_counter() - asked
        load_seconds = waited if engine.take_start_report() else 0.0
        # Tokenized in the shard's thread: overlaps the engine's work on other shards.
        pending, errors = engine.prepare(requests, sampling)
        try:
            outputs, seconds = engine.generate_prepared(pending, errors, sampling, self.config.reasoning_parser)
        except Exception:
            if engine.loop.stopped:  # the engine failed for good (or was swapped): the retry builds a fresh one
                with _engine_lock:
                    if _engine is engine:
                        _close_engine()
            raise
        # the batch limit this shard finished with (lower than it started with after an out-of-memory)
        return GenerateResult(outputs, seconds, requests.num_rows, engine.max_num_seqs, load_seconds)
