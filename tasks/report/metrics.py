"""Prometheus metrics of the runs in this process, served over HTTP while they go (no Prefect).

Nothing is counted here: a scrape reads each run's `RunProgress` snapshot and the engine's status
at that moment (pull, not push), so the engine loop pays for plain integer increments only. One
collector per process holds every run it serves; each series carries the run's `run_id` and no
per-request label. docs/monitoring.md lists every metric.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tasks.config import MetricsConfig
from tasks.engines.vllm import ENGINE_STATES, EngineStatus, engine_status
from tasks.report.progress import ProgressSnapshot, RunProgress, progress_json

logger = logging.getLogger(__name__)

# name: (type, help, labels besides run_id)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "vbf_run_info": (
        "gauge",
        "1 for each run this process serves; its dataset, model and engine as labels.",
        ("dataset", "model", "engine"),
    ),
    "vbf_run_requests": ("gauge", "The run's unique requests (what it has to answer).", ()),
    "vbf_requests_total": (
        "counter",
        "The run's requests that finished: done (answered by the engine in this run), cached (answered before), failed (an error row).",
        ("state",),
    ),
    "vbf_requests_pending": ("gauge", "The run's requests not finished: running (in the engine) or queued.", ("state",)),
    "vbf_prompt_tokens_total": ("counter", "Prompt tokens of the requests the engine answered in this run.", ()),
    "vbf_generated_tokens_total": ("counter", "Tokens the engine generated in this run.", ()),
    "vbf_run_shards": ("gauge", "The run's shards.", ()),
    "vbf_run_shards_finished": ("gauge", "The run's shards that finished (computed or from the cache).", ()),
    "vbf_eta_seconds": (
        "gauge",
        "Estimated seconds until the run's last request finishes, at the rate of the last 30 s (absent until known).",
        (),
    ),
    "vbf_run_ended": ("gauge", "1 once the run's inference has ended (its counts are final), else 0.", ()),
    "vbf_engine_state": ("gauge", "1 for the state the process's engine is in: stopped, loading, ready, restarting.", ("state",)),
    "vbf_engine_requests": ("gauge", "vLLM's own scheduler: requests running in its batch, and waiting.", ("state",)),
    "vbf_engine_kv_cache_usage_ratio": ("gauge", "vLLM's KV-cache usage, 0 to 1.", ()),
}


@dataclass
class WatchedRun:
    run_id: str
    progress: RunProgress
    info: dict[str, str]
    engine: Callable[[], EngineStatus] | None  # None: the engine runs elsewhere (an OpenAI server, worker groups)


def families() -> dict[str, Metric]:
    made: dict[str, Metric] = {}
    for name, (kind, help_text, labels) in METRICS.items():
        family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        made[name] = family(name, help_text, labels=["run_id", *labels])
    return made


def add_run(made: dict[str, Metric], run: WatchedRun, snapshot: ProgressSnapshot) -> None:
    """The run's samples, added to each family."""
    run_id = run.run_id
    made["vbf_run_info"].add_metric([run_id, run.info["dataset"], run.info["model"], run.info["engine"]], 1)
    made["vbf_run_requests"].add_metric([run_id], snapshot.total)
    for state in ("done", "cached", "failed"):
        made["vbf_requests_total"].add_metric([run_id, state], getattr(snapshot, state))
    for state in ("running", "queued"):
        made["vbf_requests_pending"].add_metric([run_id, state], getattr(snapshot, state))
    made["vbf_prompt_tokens_total"].add_metric([run_id], snapshot.prompt_tokens)
    made["vbf_generated_tokens_total"].add_metric([run_id], snapshot.generated_tokens)
    made["vbf_run_shards"].add_metric([run_id], snapshot.shards)
    made["vbf_run_shards_finished"].add_metric([run_id], snapshot.shards_finished)
    if snapshot.eta_seconds is not None:
        made["vbf_eta_seconds"].add_metric([run_id], snapshot.eta_seconds)
    made["vbf_run_ended"].add_metric([run_id], float(snapshot.ended))
    if run.engine is None:
        return
    engine = run.engine()
    for state in ENGINE_STATES:
        made["vbf_engine_state"].add_metric([run_id, state], float(engine.state == state))
    for state in ("running", "waiting"):
        if getattr(engine, state) is not None:
            made["vbf_engine_requests"].add_metric([run_id, state], getattr(engine, state))
    if engine.kv_cache_usage is not None:
        made["vbf_engine_kv_cache_usage_ratio"].add_metric([run_id], engine.kv_cache_usage)


class RunsCollector:
    """Every run the process serves metrics for; a scrape reads each one's snapshot then."""

    def __init__(self) -> None:
        self.runs: dict[str, WatchedRun] = {}
        self.scraped = threading.Condition()
        self.scrapes = 0

    def describe(self) -> list[Metric]:
        return list(families().values())

    def collect(self) -> Iterator[Metric]:
        made = families()
        for run in list(self.runs.values()):
            add_run(made, run, run.progress.snapshot())
        with self.scraped:
            self.scrapes += 1
            self.scraped.notify_all()
        yield from made.values()

    def wait_for_scrape(self, after: int, timeout: float) -> bool:
        """Whether a scrape came after the `after`-th one within `timeout` seconds."""
        with self.scraped:
            return self.scraped.wait_for(lambda: self.scrapes > after, timeout=timeout)


registry = CollectorRegistry(auto_describe=False)
collector = RunsCollector()
registry.register(collector)
ProcessCollector(registry=registry)  # the process's CPU and memory, beside its runs

_servers: dict[tuple[str, int], int] = {}  # (host, port asked) -> the port served; one server per process and address
_servers_lock = threading.Lock()


def serve(host: str, port: int) -> int:
    """Serve the registry at http://host:port/metrics (started once per process and address); the port served."""
    with _servers_lock:
        if (host, port) not in _servers:
            server, _ = start_http_server(port, addr=host, registry=registry)
            _servers[(host, port)] = server.server_address[1]
            logger.info("Prometheus metrics on http://%s:%d/metrics", host, _servers[(host, port)])
        return _servers[(host, port)]


@contextmanager
def writing_progress(path: str | None, progress: RunProgress, every_seconds: float = 1.0) -> Iterator[None]:
    """Rewrite `path` with the run's progress every second while the block runs, and once more at its end
    (nothing when no path is set). Each write replaces the file whole, so a reader never sees half of one."""
    if path is None:
        yield
        return
    stopped = threading.Event()

    def write(snapshot: ProgressSnapshot) -> None:
        partial = Path(f"{path}.partial")
        partial.write_text(progress_json(snapshot))
        os.replace(partial, path)

    def keep_writing() -> None:
        while not stopped.wait(every_seconds):
            write(progress.snapshot())

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write(progress.snapshot())
    writer = threading.Thread(target=keep_writing, name="progress-file", daemon=True)
    writer.start()
    try:
        yield
    finally:
        stopped.set()
        writer.join()
        write(progress.end())


@contextmanager
def serving_metrics(
    config: MetricsConfig,
    run_id: str,
    progress: RunProgress,
    info: dict[str, str],
    engine_here: bool = False,
) -> Iterator[int | None]:
    """Serve the run's metrics while the block runs (nothing when no port is set); yields the port.
    `info` labels vbf_run_info (dataset, model, engine); with `engine_here`, the process's vLLM engine is reported too.

    At the end the run's counts are final; if anything scraped meanwhile, serving goes on until one
    more scrape has read them (at most `final_scrape_seconds`), so a dashboard ends at the true total.
    """
    if config.port is None:
        yield None
        return
    port = serve(config.host, config.port)
    collector.runs[run_id] = WatchedRun(run_id, progress, info, engine_status if engine_here else None)
    scrapes_at_start = collector.scrapes
    try:
        yield port
    finally:
        progress.end()
        if collector.scrapes > scrapes_at_start:
            collector.wait_for_scrape(collector.scrapes, config.final_scrape_seconds)
        collector.runs.pop(run_id, None)
