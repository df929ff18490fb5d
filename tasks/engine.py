"""The in-process vLLM engine: built once per process, reused by every shard, one generate at a time."""

from __future__ import annotations

import copy
import gc
import itertools
import json
import queue
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pydantic import ValidationError

from tasks.config import ModelConfig, SamplingConfig, SpecError, describe_errors
from tasks.render import content_hash

OUTPUT_SCHEMA = pa.schema(
    [
        ("request_key", pa.string()),
        ("sample_index", pa.int32()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("mean_logprob", pa.float64()),  # mean over the completion's tokens; only when logprobs were asked
        ("latency_seconds", pa.float64()),  # queued to last token
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


def sampling_hash(sampling: SamplingConfig) -> str:
    return content_hash(sampling.model_dump(mode="json"))


def request_sampling(base: SamplingConfig, overrides: str | None) -> SamplingConfig:
    """The run's sampling with a row's overrides (a JSON object of SamplingConfig fields) applied."""
    if not overrides:
        return base
    try:
        values = json.loads(overrides)
        if not isinstance(values, dict):
            raise ValueError("overrides must be a JSON object")
        return SamplingConfig.model_validate({**base.model_dump(), **values})
    except ValidationError as error:
        raise ValueError(f"invalid sampling override: {describe_errors(error)}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"overrides are not JSON: {error}") from error


def vllm_sampling_params(sampling: SamplingConfig, max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if sampling.structured is not None:
        s = sampling.structured
        structured = StructuredOutputsParams(json=s.json_schema, regex=s.regex, choice=s.choice)
    # SamplingConfig's field names are vLLM's own
    return SamplingParams(
        **sampling.model_dump(exclude={"max_tokens", "stop", "structured"}),
        max_tokens=max_tokens,
        stop=sampling.stop or None,
        structured_outputs=structured,
    )


def error_row(request_key: str, code: str, message: str, prompt_tokens: int | None = None) -> dict:
    return {
        "request_key": request_key,
        "sample_index": 0,
        "text": None,
        "finish_reason": None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": None,
        "mean_logprob": None,
        "latency_seconds": None,
        "error_code": code,
        "error": message,
    }


@dataclass
class PendingRequest:
    request_key: str
    token_ids: list[int]
    sampling: SamplingConfig


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


class Submission:
    """One generate call's requests in the engine loop; done once every request has its outcome."""

    def __init__(self, pending: list[PendingRequest], params: list, lora_request, shared_sampling: bool):
        self.pending, self.params, self.lora_request = pending, params, lora_request
        self.shared_sampling = shared_sampling  # every request has the run's sampling: a rejection is the run's fault
        self.outcomes: list = [None] * len(pending)  # RequestOutput, or the exception that rejected the request
        self.remaining = len(pending)
        self.engine_seconds = 0.0  # engine wall time spent while this was the oldest unfinished submission
        self.error: BaseException | None = None
        self.done = threading.Event()

    def settle(self, index: int, outcome) -> None:
        self.outcomes[index] = outcome
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def wait(self) -> list:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.outcomes


class EngineLoop:
    """The one thread that drives vLLM: it adds each shard's requests as they come and steps the
    engine without pause, so the running batch stays full across shard boundaries instead of
    draining at the end of every generate call. Each shard waits only for its own requests.

    A shard is admitted while fewer than `admit_below` requests are unfinished (two full batches):
    the next shard queues behind the running one, and shards still finish roughly in order.
    """

    def __init__(self, llm, admit_below: int):
        self.llm = llm
        self.admit_below = admit_below
        self.inbox: queue.Queue[Submission | None] = queue.Queue()
        self.owner: dict[str, tuple[Submission, int]] = {}  # vLLM request id -> (submission, index)
        self.unfinished: list[Submission] = []  # oldest first
        self.room = threading.Condition()
        self.queued = 0  # requests submitted and not finished
        self.stopped = False
        self.serial = itertools.count()
        self.thread = threading.Thread(target=self.run, name="vllm-engine-loop", daemon=True)
        self.thread.start()

    def submit(self, submission: Submission) -> Submission:
        with self.room:
            self.room.wait_for(lambda: self.stopped or self.queued < self.admit_below)
            if self.stopped:
                raise EngineRestarted("the engine was closed while this shard waited")
            self.queued += len(submission.pending)
            self.inbox.put(submission)  # under the lock: a stopping loop sees it in its last look at the inbox
        return submission

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=60)

    def run(self) -> None:
        try:
            self.drive()
        except BaseException as error:  # the engine died, or this loop broke: no shard may wait forever
            self.fail_unfinished(error, [])

    def drive(self) -> None:
        last_step = time.perf_counter()
        while True:
            arrived = self.take_arrivals(wait=not self.owner)
            if None in arrived:
                self.fail_unfinished(EngineRestarted("the engine was closed while this shard waited"), arrived)
                return
            if not self.owner:
                last_step = time.perf_counter()  # idle until now: that time is nobody's
            for submission in arrived:
                self.add(submission)
            if not self.owner:
                continue
            outputs = self.llm.llm_engine.step()
            now = time.perf_counter()
            if self.unfinished:
                self.unfinished[0].engine_seconds += now - last_step
            last_step = now
            for output in outputs:
                owner = self.owner.pop(output.request_id, None) if output.finished else None
                if owner is not None:
                    self.settle(*owner, output)

    def take_arrivals(self, wait: bool) -> list[Submission | None]:
        arrived = [self.inbox.get()] if wait else []
        while True:
            try:
                arrived.append(self.inbox.get_nowait())
            except queue.Empty:
                return arrived

    def add(self, submission: Submission) -> None:
        """Hand the submission's requests to vLLM one by one: a request vLLM rejects is settled with the error."""
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        self.unfinished.append(submission)
        added: list[str] = []
        for index, (request, params) in enumerate(zip(submission.pending, submission.params)):
            params.output_kind = RequestOutputKind.FINAL_ONLY  # the finished output only, as LLM.generate asks
            request_id = f"request-{next(self.serial)}"
            try:
                self.llm.llm_engine.add_request(
                    request_id, {"prompt_token_ids": request.token_ids}, params, lora_request=submission.lora_request
                )
            except VLLMValidationError as error:
                if submission.shared_sampling:  # every request has the run's sampling: the run's configuration is at fault
                    self.abort(added)
                    self.reject(submission, SpecError(f"sampling parameters rejected by vLLM: {error}"))
                    return
                self.settle(submission, index, error)  # a row's own parameters are at fault: the others run
                continue
            except Exception as error:
                self.abort(added)
                self.reject(submission, error)
                return
            added.append(request_id)
            self.owner[request_id] = (submission, index)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.llm.llm_engine.abort_request(request_ids)
            for request_id in request_ids:
                del self.owner[request_id]

    def settle(self, submission: Submission, index: int, outcome) -> None:
        submission.settle(index, outcome)
        self.release(1)
        if submission.done.is_set():
            self.unfinished.remove(submission)

    def reject(self, submission: Submission, error: BaseException) -> None:
        submission.fail(error)
        if submission in self.unfinished:
            self.unfinished.remove(submission)
        self.release(submission.remaining)

    def fail_unfinished(self, error: BaseException, arrived: list[Submission | None]) -> None:
        """The loop ends: fail every submission it holds or that is still in the inbox."""
        with self.room:
            self.stopped = True
            arrived = [*arrived, *self.take_arrivals(wait=False)]
            for submission in [*self.unfinished, *(s for s in arrived if s is not None)]:
                submission.fail(error)
            self.owner.clear()
            self.unfinished.clear()
            self.queued = 0
            self.room.notify_all()

    def release(self, requests: int) -> None:
        with self.room:
            self.queued -= requests
            # Called per finished request: waking every waiting shard each time costs a core's worth of wake-ups.
            if self.queued < self.admit_below:
                self.room.notify_all()


class VllmEngine:
    def __init__(self, config: ModelConfig):
        from vllm import LLM

        self.config = config
        self.llm = LLM(**engine_arguments(config))
        self.loop = EngineLoop(self.llm, admit_below=2 * self.max_num_seqs)
        # prepare() tokenizes in shard threads while generate() detokenizes: each gets its own copy
        self.tokenizer = copy.deepcopy(self.llm.get_tokenizer())
        self.prepare_lock = threading.Lock()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.start_reported = False
        self.requests_sent = 0  # how many requests reached the engine in this process

    def take_start_report(self) -> bool:
        """True for the first shard to use the engine: it reports how long it waited for the start."""
        reported, self.start_reported = self.start_reported, True
        return not reported

    def prompt_token_ids(self, prompt: str | None, messages: str | None) -> list[int]:
        if messages is not None:
            return list(
                self.tokenizer.apply_chat_template(
                    json.loads(messages), add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return list(self.tokenizer.encode(prompt))

    def lora_request(self):
        adapter = self.config.lora_adapter
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.name, zlib.crc32(adapter.name.encode()) % 1_000_000 + 1, adapter.path)

    def prepare(self, shard: pa.Table, sampling: SamplingConfig) -> tuple[list[PendingRequest], list[dict]]:
        """Requests ready for the engine, and error rows for those that cannot run on their own."""
        with self.prepare_lock:
            return self._prepare(shard, sampling)

    def _prepare(self, shard: pa.Table, sampling: SamplingConfig) -> tuple[list[PendingRequest], list[dict]]:
        overrides = shard["overrides"].to_pylist() if "overrides" in shard.column_names else [None] * shard.num_rows
        pending: list[PendingRequest] = []
        errors: list[dict] = []
        for request_key, prompt, messages, override in zip(
            shard["request_key"].to_pylist(), shard["prompt"].to_pylist(), shard["messages"].to_pylist(), overrides
        ):
            try:
                request = request_sampling(sampling, override)
            except ValueError as error:
                errors.append(error_row(request_key, "invalid_request", str(error)))
                continue
            try:
                token_ids = self.prompt_token_ids(prompt, messages)
            except Exception as error:  # a chat template that rejects these messages, say
                errors.append(error_row(request_key, "invalid_prompt", f"{type(error).__name__}: {error}"))
                continue
            if len(token_ids) >= self.max_model_len:
                message = f"prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len}"
                errors.append(error_row(request_key, "context_length_exceeded", message, len(token_ids)))
                continue
            pending.append(PendingRequest(request_key, token_ids, request))
        return pending, errors

    def generate(self, shard: pa.Table, sampling: SamplingConfig, batch_size: int | None = None) -> pa.Table:
        """The shard's outputs, one submission to the engine loop (or chunks of batch_size).

        A request that cannot run on its own (prompt longer than the context, a bad per-row
        override or schema) becomes an error row, like the error file of an OpenAI batch.
        """
        pending, errors = self.prepare(shard, sampling)
        return self.generate_prepared(pending, errors, sampling, batch_size)[0]

    def generate_prepared(
        self, pending: list[PendingRequest], errors: list[dict], sampling: SamplingConfig, batch_size: int | None
    ) -> tuple[pa.Table, float]:
        """The outputs, and the engine seconds they took."""
        rows, seconds = list(errors), 0.0
        size = batch_size or max(len(pending), 1)
        for start in range(0, len(pending), size):
            chunk = pending[start : start + size]
            chunk_rows, chunk_seconds = self.run(chunk, shared_sampling=all(r.sampling is sampling for r in chunk))
            rows.extend(chunk_rows)
            seconds += chunk_seconds
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), seconds

    def run(self, pending: list[PendingRequest], shared_sampling: bool = False) -> tuple[list[dict], float]:
        """Rows for these requests, and the engine seconds they took."""
        if not pending:
            return [], 0.0
        params = [vllm_sampling_params(r.sampling, min(r.sampling.max_tokens, self.max_model_len - len(r.token_ids))) for r in pending]
        submission = self.loop.submit(Submission(pending, params, self.lora_request(), shared_sampling))
        outcomes = submission.wait()
        self.requests_sent += len(pending)
        rows = []
        for request, outcome in zip(pending, outcomes):
            if isinstance(outcome, Exception):  # vLLM rejected this request on its own (its override, its schema)
                rows.append(error_row(request.request_key, "invalid_request", str(outcome), len(request.token_ids)))
                continue
            stats = outcome.metrics
            latency = stats.last_token_ts - stats.queued_ts if stats is not None and stats.last_token_ts else None
            for completion in outcome.outputs:
                tokens = len(completion.token_ids)
                mean_logprob = None
                if request.sampling.logprobs is not None and completion.cumulative_logprob is not None and tokens:
                    mean_logprob = completion.cumulative_logprob / tokens
                rows.append(
                    {
                        "request_key": request.request_key,
                        "sample_index": completion.index,
                        "text": completion.text,
                        "finish_reason": completion.finish_reason,
                        "prompt_tokens": len(request.token_ids),
                        "completion_tokens": tokens,
                        "mean_logprob": mean_logprob,
                        "latency_seconds": latency,
                        "error_code": None,
                        "error": None,
                    }
                )
        return rows, submission.engine_seconds

    @property
    def max_num_seqs(self) -> int:
        return self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs

    def close(self, timeout: float | None = None) -> None:
        self.loop.stop()  # from here on a shard's submission raises EngineRestarted
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown(timeout=timeout)
        del self.llm


_engine_lock = threading.Lock()
_engine: VllmEngine | None = None


def get_engine(config: ModelConfig) -> VllmEngine:
    """The process's engine for these engine args; other args replace (and free) the previous engine."""
    global _engine
    with _engine_lock:
        if _engine is not None and _engine.config.vllm_args() != config.vllm_args():
            _close_engine()
        if _engine is None:
            _engine = VllmEngine(config)
        elif _engine.config != config:
            _engine.config = config  # same engine; the adapter (or other per-run settings) may differ
        return _engine


def start_engine_in_background(config: ModelConfig) -> None:
    """Start loading the engine in a thread, so its start overlaps the work before the first shard.

    A load that fails is left to the shard that needs the engine to raise, in its own context.
    vLLM is imported here, in the caller's thread: imported in the thread, beside whatever the
    caller goes on with, the import (seconds: torch, transformers) shares one GIL and takes longer.
    """
    from vllm import LLM  # noqa: F401

    def load() -> None:
        try:
            get_engine(config)
        except Exception:  # noqa: BLE001 - the first shard loads again and reports the error
            pass

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
        gc.collect()


class ShardOutOfMemory(RuntimeError):
    """Transient: the retry runs the shard in smaller generate batches."""


class EngineRestarted(RuntimeError):
    """Transient: the engine this shard prepared for was closed (crashed or swapped); the retry uses the new one."""


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# After an out-of-memory, the shard's next attempt runs in batches of at most this many requests.
_batch_limits: dict[str, int] = {}

@dataclass
class GenerateResult:
    outputs: pa.Table
    seconds: float
    batch_size: int
    max_num_seqs: int | None
    engine_load_seconds: float = 0.0


def generate_with_engine(config: ModelConfig, shard: pa.Table, sampling: SamplingConfig, key: str) -> GenerateResult:
    from vllm.v1.engine.exceptions import EngineDeadError

    asked = time.perf_counter()
    engine = get_engine(config)
    waited = time.perf_counter() - asked
    load_seconds = waited if engine.take_start_report() else 0.0
    limit = _batch_limits.get(key)
    pending, errors = engine.prepare(shard, sampling)  # in the shard's thread: overlaps the engine's work on other shards
    try:
        outputs, seconds = engine.generate_prepared(pending, errors, sampling, limit)
    except EngineDeadError:
        close_engine()  # the retry builds a fresh one
        raise
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        smaller = max(1, (limit or shard.num_rows) // 2)
        _batch_limits[key] = smaller
        raise ShardOutOfMemory(f"out of memory; the retry runs batches of {smaller} requests: {error}") from error
    return GenerateResult(outputs, seconds, limit or shard.num_rows, engine.max_num_seqs, load_seconds)
