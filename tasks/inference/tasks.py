"""Inference's Prefect tasks: one cached task per shard, run here or in groups on the shard-worker
deployment. The cache key is the content of the work (see `keys.output_key`), never the run, and
the cache is how worker groups hand results back: a group's run only has to finish.

The cache is ours, not Prefect's: a shard's record is its manifest as JSON next to its output
file (`job.read_manifest`). Prefect's records are pickles, or name the serializer that reads them,
and the storage is shared: whoever can write there would run code in every process that reads it."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.runtime import flow_run
from prefect.states import Completed, State
from tqdm import tqdm

from blocks import secret_value
from tasks import keys, storage
from tasks.config import ModelConfig, RerunConfig, StoreConfig, WorkersConfig
from tasks.engines import open_engine
from tasks.engines.base import prompt_token_ids
from tasks.inference.estimate import PendingTokens, Throughput, count_pending
from tasks.inference.job import (
    PERMANENT_ERRORS,
    InferenceJob,
    ShardOutput,
    check_model,
    output_file,
    read_manifest,
    reusable,
    split_groups,
    summarize_outputs,
)
from tasks.inference.journal import ShardJournal, generate_in_parts
from tasks.inference.rerun import RerunPlan, rerun_plan
from tasks.prepare.requests import RequestSet, pending_requests
from tasks.prepare.shard import Shard
from tasks.report.progress import ProgressSnapshot, RunProgress, format_line, live_counts
from tasks.store.queries import answered_keys, generation_rate, rerun_source

logger = logging.getLogger(__name__)

Dispatch = Literal["local", "workers"]


# Set when the process is told to stop (Ctrl-C, SIGTERM, a cancel): a shard that then fails is not retried.
stopping = threading.Event()


def is_transient(_task, _task_run, state) -> bool:
    return not stopping.is_set() and not isinstance(state.data, PERMANENT_ERRORS)


# The shards of one process share its one engine and take turns on it anyway: they share one slot.
_slot_lock = threading.Lock()


@contextmanager
def engine_slot(model: ModelConfig, gpu_limit: str | None) -> Iterator[None]:
    """Hold the model's GPUs in the global concurrency limit while this shard loads and runs the engine.

    Taken inside the task body, so a cached shard returns at once without waiting for a GPU; taken
    by one shard of a process at a time, so a process never holds more slots than its one engine needs.
    """
    if gpu_limit is None or model.engine != "vllm":
        yield
        return
    with _slot_lock, concurrency(gpu_limit, occupy=model.tensor_parallel_size, strict=False):
        yield


@task(name="generate-shard", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=is_transient)
def generate_shard(shard: Shard, job: InferenceJob) -> ShardOutput | State:
    """Compute a shard and write its output file, then its manifest; a shard with both returns at once.
    Parts an interrupted attempt finished come from the shard's journal, not the engine."""
    done = read_manifest(job, shard)
    if reusable(done):
        # a kill between writing the manifest and removing the journal leaves the journal behind
        ShardJournal(job.journal_folder(shard)).remove()
        return Completed(name="Cached", data=done)  # shown as Cached, like a hit of Prefect's own cache
    key, path, journal = job.output_key(shard), job.output_path(shard), ShardJournal(job.journal_folder(shard))
    if done is not None:  # its answers stay; only its transient errors are asked again
        journal.append(storage.read_parquet(path))
    engine = open_engine(job.model, secret_value(job.model.api_key_secret), job.storage)
    with engine_slot(job.model, job.sharding.gpu_limit):
        requests = storage.read_parquet(shard.path)
        result, fresh = generate_in_parts(engine, requests, job.sampling, key, journal, job.sharding.part_size)
    storage.write_parquet(output_file(shard, key, result.outputs), path)
    output = summarize_outputs(shard, key, path, result, fresh)
    storage.write_text(output.model_dump_json(), job.manifest_path(shard))  # last: the file it names is complete
    journal.remove()
    return output


@task(name="fingerprint-model")
def fingerprint_model(model: ModelConfig, storage: str) -> str:
    """The model's key, checked on the way: its folder is there, or its server answers with our key.

    File hashes are remembered in the storage folder, so unchanged weights are read once.
    """
    check_model(model)
    served = None
    if model.engine == "openai":
        from tasks.engines.openai import served_model

        served = served_model(model, secret_value(model.api_key_secret))
    return keys.model_fingerprint(model, keys.hash_memo_path(storage), served)


@task(name="plan-rerun")
def plan_rerun(rerun: RerunConfig, max_tokens: int | None, store: StoreConfig) -> RerunPlan:
    """What the earlier run asked, how many of its answers were cut off, and the larger budget they get."""
    source = rerun_source(store.duckdb_path, rerun.run_id, rerun.cut_off, store.lock_timeout_seconds)
    return rerun_plan(source, rerun, max_tokens)


ShardDone = Callable[[ShardOutput, bool], None]  # a finished shard's manifest, and whether it came from the cache


def ignore_shard(_output: ShardOutput, _cached: bool) -> None:
    pass


class Progress:
    """A run's progress by the request, shown while it goes: a bar with tokens/s and ETA on a terminal,
    a plain line every `line_seconds` when stderr is no terminal (piped, a log file), and the flow
    run's progress artifact at most every `artifact_seconds` (each update is a call to Prefect's API).

    A thread of its own draws the terminal every `tick_seconds`; it touches neither Prefect nor
    logging. The artifact is updated from the flow's thread (`refresh_artifact`, called as it waits for
    shards), and not while this process's engine is being built: vLLM's first start applies its
    logging config, and dictConfig holds logging's lock while it flushes every handler. Flushing
    Prefect's API log handler drains all of Prefect's services, its event worker too, under
    Prefect's service lock, and waits (5 s a handler) for them to close, which needs logging's lock.
    An artifact update then emits an event, builds a new event worker under the service lock and
    asks logging's lock for its logger: each thread holds what the other waits for, and the
    process hangs (a worker group's run never finished a shard)."""

    def __init__(
        self,
        run: RunProgress,
        description: str,
        tick_seconds: float = 1.0,
        line_seconds: float = 5.0,
        artifact_seconds: float = 3.0,
    ):
        self.run, self.tick_seconds, self.line_seconds, self.artifact_seconds = run, tick_seconds, line_seconds, artifact_seconds
        self.artifact = create_progress_artifact(
            0.0 if run.total else 100.0, key="batch-inference-progress", description=description
        )
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=run.total, desc="requests", unit="req", disable=not self.terminal, dynamic_ncols=True)
        self.shown_line = self.shown_artifact = -math.inf
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.tick, name="progress", daemon=True)
        self.thread.start()

    def tick(self) -> None:
        while not self.stopped.wait(self.tick_seconds):
            self.show(self.run.snapshot(), final=False)

    def show(self, snapshot: ProgressSnapshot, final: bool) -> None:
        now = time.monotonic()
        if self.terminal:
            self.bar.n = snapshot.finished
            self.bar.set_postfix_str(format_line(snapshot).split(" · ", 1)[1])  # the bar shows the count itself
        elif final or now - self.shown_line >= self.line_seconds:
            sys.stderr.write(format_line(snapshot) + "\n")  # not print: a flow's print is a Prefect log record
            sys.stderr.flush()
            self.shown_line = now

    def refresh_artifact(self, snapshot: ProgressSnapshot | None = None) -> None:
        """Move the artifact, at most every artifact_seconds unless given the final snapshot (the flow's thread only)."""
        now = time.monotonic()
        if snapshot is None and now - self.shown_artifact < self.artifact_seconds or self.run.engine_starting():
            return
        self.shown_artifact = now
        snapshot = snapshot or self.run.snapshot()
        try:
            update_progress_artifact(self.artifact, 100.0 * snapshot.finished / snapshot.total if snapshot.total else 100.0)
        except Exception as error:  # the UI's progress is not worth failing a run for
            logger.warning("could not update the progress artifact: %s", error)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        final = self.run.end()
        self.show(final, final=True)
        self.refresh_artifact(final)
        self.bar.close()


def generate_here(
    shards: list[Shard],
    job: InferenceJob,
    description: str,
    on_finished: ShardDone = ignore_shard,
    progress: RunProgress | None = None,
) -> tuple[list[ShardOutput], list[bool]]:
    """Every shard in this process, at most `shards_in_flight` at a time (the others wait unread); each
    finished shard goes to on_finished at once, and is counted in `progress` (by default, one of these
    shards' requests). Returns every manifest, and whether it came from the cache.

    After a shard fails (all its retries spent) no new shard starts; the ones in flight finish first.
    """
    generate = generate_shard.with_options(retries=job.sharding.retries, retry_delay_seconds=job.sharding.retry_delay_seconds)
    stopping.clear()
    waiting, running = deque(shards), {}
    finished: dict[str, tuple[ShardOutput, bool]] = {}
    failed: list[PrefectFuture] = []
    done: PrefectFuture | None = None  # a finished shard not yet handed on
    progress = progress or RunProgress(
        sum(shard.requests for shard in shards), len(shards), live=live_counts(job.model.engine == "vllm")
    )
    display = Progress(progress, description)
    try:
        while waiting or running:
            while waiting and len(running) < job.sharding.shards_in_flight and not failed:
                shard = waiting.popleft()
                running[generate.submit(shard, job)] = shard
            if not running:
                break
            while not (finished_now := wait(list(running), timeout=display.artifact_seconds).done):
                display.refresh_artifact()
            done = next(iter(finished_now))
            done.wait()  # sets its final state here: the server may not have it yet
            del running[done]
            if not done.state.is_completed():
                failed.append(done)
                continue
            output, cached = done.result(), done.state.name == "Cached"
            on_finished(output, cached)
            progress.shard_finished(output, cached)
            finished[output.shard_key] = (output, cached)
            done = None
    except BaseException:  # Ctrl-C, SIGTERM, a cancel: admit no more; finish (or abort) what is in flight
        stop_shards([*running, *([done] if done is not None else [])], job, on_finished)
        raise
    finally:
        display.close()
    for future in failed:
        future.result()  # raises its error
    return [finished[s.shard_key][0] for s in shards], [finished[s.shard_key][1] for s in shards]


def stop_shards(running: list[PrefectFuture], job: InferenceJob, on_finished: ShardDone) -> None:
    """Stop: with on_stop="finish", wait for the shards in flight and hand on those that finished;
    with "abort", close the engine so they end now (each keeps its finished parts for the next run)."""
    stopping.set()
    if job.sharding.on_stop == "abort" and job.model.engine == "vllm":
        from tasks.engines.vllm import close_engine

        close_engine(timeout=0)
    for future in as_completed(running):
        future.wait()
        if future.state.is_completed():
            on_finished(future.result(), future.state.name == "Cached")


@task(name="run-shard-group", cache_policy=NO_CACHE)
def run_shard_group(group: int, shards: list[Shard], job: InferenceJob, workers: WorkersConfig) -> str:
    """One flow run of the shard-worker deployment for this group; raises unless it Completed."""
    devices = workers.devices[group % len(workers.devices)] if workers.devices else None
    run = run_deployment(
        workers.deployment,
        parameters={"shards": [shard.model_dump() for shard in shards], "job": job.model_dump(mode="json")},
        job_variables={"env": {"CUDA_VISIBLE_DEVICES": devices}} if devices is not None else None,
        flow_run_name=f"{flow_run.name or 'batch-inference'}-group-{group}",
        poll_interval=workers.poll_seconds,
    )
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"shard group {group} ({len(shards)} shards): flow run {run.name} ended {state}")
    return run.name


def generate_on_workers(
    shards: list[Shard],
    job: InferenceJob,
    n_workers: int,
    workers: WorkersConfig,
    description: str,
    on_finished: ShardDone = ignore_shard,
    progress: RunProgress | None = None,
) -> tuple[list[ShardOutput], list[bool]]:
    """Dispatch the shards not yet in the cache in n_workers groups; while they run, hand each shard on
    as its manifest appears (counted in `progress`: the engines are elsewhere, so by the shard); then
    read every manifest back."""
    progress = progress or RunProgress(sum(shard.requests for shard in shards), len(shards))
    manifests = [read_manifest(job, shard) for shard in shards]
    cached = [reusable(manifest) for manifest in manifests]
    groups = split_groups([shard for shard, hit in zip(shards, cached) if not hit], n_workers)
    get_run_logger().info(
        "%d of %d shards already cached; dispatching %d in %d groups to %s",
        sum(cached),
        len(shards),
        len(shards) - sum(cached),
        len(groups),
        workers.deployment,
    )
    for manifest, hit in zip(manifests, cached):
        if hit:
            on_finished(manifest, True)
            progress.shard_finished(manifest, True)
    awaited = [shard for shard, hit in zip(shards, cached) if not hit]
    run_group = run_shard_group.with_options(retries=workers.group_retries, retry_delay_seconds=5)
    futures = [run_group.submit(i, group, job, workers) for i, group in enumerate(groups)]
    display = Progress(progress, description)
    try:
        not_done = set(futures)
        while not_done or awaited:
            _, not_done = wait(list(not_done), timeout=workers.poll_seconds)
            display.refresh_artifact()
            for shard in list(awaited):
                if reusable(manifest := read_manifest(job, shard)):
                    on_finished(manifest, False)
                    progress.shard_finished(manifest, False)
                    awaited.remove(shard)
            if not not_done:
                break
    finally:
        display.close()
    for future in futures:
        if not future.state.is_completed():
            future.result()  # raises the error of a group that failed all its attempts
    for shard in awaited:  # finished with transient errors: handed on now that its group is done
        on_finished(output := read_back(job, shard), False)
        progress.shard_finished(output, False)
    return [read_back(job, shard) for shard in shards], cached


def read_back(job: InferenceJob, shard: Shard) -> ShardOutput:
    """A shard's manifest once its group has finished."""
    if (output := read_manifest(job, shard)) is None:
        raise RuntimeError(f"shard {shard.shard_key}: its group finished, but {job.manifest_path(shard)} is missing or invalid")
    return output


def generate_shards_of_run(
    dispatch: Dispatch,
    shards: list[Shard],
    job: InferenceJob,
    n_workers: int,
    workers: WorkersConfig,
    description: str,
    on_finished: ShardDone = ignore_shard,
    progress: RunProgress | None = None,
) -> tuple[list[ShardOutput], list[bool]]:
    """Every shard's manifest, and whether it came from the cache; each finished shard goes to on_finished
    and is counted in `progress`."""
    if dispatch == "workers":
        return generate_on_workers(shards, job, n_workers, workers, description, on_finished, progress)
    return generate_here(shards, job, description, on_finished, progress)


# ---------------------------------------------------------------- a dry run's measurements


def tokenizer_of(model: ModelConfig):
    """The model's own tokenizer (and chat template), as vLLM loads it; None for a served model we cannot read."""
    if model.engine != "vllm":
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.model, revision=model.revision)


def approx_token_count(prompt: str | None, messages: str | None) -> int:
    return -(-len(prompt if messages is None else messages) // 4)  # characters / 4, as the shard budget counts


@task(name="count-pending-tokens")
def count_pending_tokens(request_set: RequestSet, job: InferenceJob, store: StoreConfig) -> tuple[PendingTokens, bool]:
    """The requests a run would send (not answered yet for this model and sampling), their exact prompt
    tokens and their most output tokens; and whether the count is exact (the model's tokenizer is here)."""
    answered = answered_keys(store.duckdb_path, job.model_fingerprint, job.sampling_hash, store.lock_timeout_seconds)
    tokenizer = tokenizer_of(job.model)
    template_kwargs = job.sampling.chat_template_kwargs  # the run's (a row's own are not read for a count)
    count = (
        approx_token_count
        if tokenizer is None
        else lambda prompt, messages: len(prompt_token_ids(tokenizer, prompt, messages, template_kwargs))
    )
    return count_pending(pending_requests(request_set, answered), job.sampling, count), tokenizer is not None


@task(name="measure-sample", cache_policy=NO_CACHE)
def measure_sample(request_set: RequestSet, job: InferenceJob, store: StoreConfig, size: int) -> Throughput | None:
    """Generate for the first `size` pending requests (nothing is stored): output tokens per request and per engine second."""
    answered = answered_keys(store.duckdb_path, job.model_fingerprint, job.sampling_hash, store.lock_timeout_seconds)
    tables, rows = [], 0
    for table in pending_requests(request_set, answered):
        tables.append(table.slice(0, size - rows))
        rows += tables[-1].num_rows
        if rows >= size:
            break
    if not rows:
        return None
    engine = open_engine(job.model, secret_value(job.model.api_key_secret), job.storage)
    result = engine.generate(pa.concat_tables(tables), job.sampling, key="dry-run-sample")
    tokens = pc.sum(result.outputs["completion_tokens"]).as_py() or 0
    return Throughput(
        tokens_per_second=tokens / result.seconds, output_tokens_per_sample=tokens / result.outputs.num_rows, source="sample"
    )


@task(name="read-generation-rate")
def read_generation_rate(job: InferenceJob, store: StoreConfig) -> Throughput | None:
    rate = generation_rate(store.duckdb_path, job.model_fingerprint, store.lock_timeout_seconds)
    return Throughput(tokens_per_second=rate, source="earlier runs") if rate else None
