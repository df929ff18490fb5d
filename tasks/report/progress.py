"""A run's progress by the request: how many are done, how fast they go, when the run will end (no Prefect).

Two sources, read together: each finished shard's manifest (exact, but a shard can take minutes)
and the process's engine counters (`tasks/engines/loop.py`: per request, live, but blind to what
never reached the engine — cached shards, parts resumed from a journal). A count shown is the
larger of the two and never goes back, so a bar or a Prometheus counter only moves forward; at the
end of the run the shards' counts are the whole truth.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tasks.engines.loop import EngineCounts
from tasks.inference.job import ShardOutput


class RateWindow:
    """Requests and tokens per second over the last `seconds`: a recent rate, so an ETA follows the
    engine's speed now rather than its average since a slow start (loading the model is no throughput)."""

    def __init__(self, seconds: float = 30.0):
        self.seconds = seconds
        self.samples: deque[tuple[float, int, int]] = deque()  # (time, requests finished, tokens generated)

    def add(self, now: float, requests: int, tokens: int) -> None:
        self.samples.append((now, requests, tokens))
        # keep one sample older than the window: the rate spans the whole window, not less
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.seconds:
            self.samples.popleft()

    def rates(self) -> tuple[float, float] | None:
        """(requests per second, tokens per second), or None before there are two moments to compare,
        or while nothing has finished yet (a rate of zero says nothing about when the run ends)."""
        if len(self.samples) < 2:
            return None
        (start, requests_then, tokens_then), (end, requests_now, tokens_now) = self.samples[0], self.samples[-1]
        if end <= start or requests_now == requests_then:
            return None
        return (requests_now - requests_then) / (end - start), (tokens_now - tokens_then) / (end - start)


def eta_seconds(remaining: int, requests_per_second: float | None) -> float | None:
    """Seconds until `remaining` requests are done at this rate; 0 when none remain, None when unknown."""
    if remaining <= 0:
        return 0.0
    if not requests_per_second:
        return None
    return remaining / requests_per_second


@dataclass(frozen=True)
class ProgressSnapshot:
    """A run's progress at one moment. `done`, `cached` and `failed` are disjoint; together with
    `running` and `queued` they add up to `total`, the run's unique requests."""

    total: int
    done: int  # answered by the engine in this run
    cached: int  # answered before: by an earlier run, or a shard in the cache
    failed: int  # ended as an error row
    running: int  # in the engine now
    queued: int  # not yet in the engine
    prompt_tokens: int
    generated_tokens: int
    shards: int
    shards_finished: int
    requests_per_second: float | None
    tokens_per_second: float | None
    eta_seconds: float | None
    ended: bool

    @property
    def finished(self) -> int:
        return self.done + self.cached + self.failed


def progress_json(snapshot: ProgressSnapshot) -> str:
    """The snapshot as the progress file holds it (MetricsConfig.progress_file), `finished` included."""
    return json.dumps({**dataclasses.asdict(snapshot), "finished": snapshot.finished, "at": time.time()})


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_line(snapshot: ProgressSnapshot) -> str:
    """One line for a log or a piped terminal: `1,200/3,000 requests (40%), 3 failed · 410 tokens/s · ETA 0:42`."""
    share = 100.0 * snapshot.finished / snapshot.total if snapshot.total else 100.0
    parts = [f"{snapshot.finished:,}/{snapshot.total:,} requests ({share:.0f}%)"]
    if snapshot.failed:
        parts[0] += f", {snapshot.failed:,} failed"
    parts.append(f"{snapshot.tokens_per_second:,.0f} tokens/s" if snapshot.tokens_per_second is not None else "- tokens/s")
    parts.append(f"ETA {format_duration(snapshot.eta_seconds)}" if snapshot.eta_seconds is not None else "ETA -")
    return " · ".join(parts)


def no_engine() -> EngineCounts:
    return EngineCounts()


def live_counts(engine_here: bool) -> Callable[[], EngineCounts]:
    """The live counts of this process's vLLM engine; none when the engine is elsewhere (a server, worker groups)."""
    if not engine_here:
        return no_engine
    from tasks.engines.vllm import engine_counts

    return engine_counts


class RunProgress:
    """The counts of one run's requests, from its finished shards and, live, from the process's engine.

    `live` returns the process's engine counters (they count every run of the process): the run
    counts what they gained since it began. Thread-safe: shards finish in the flow's thread while
    a metrics scrape or the progress line reads a snapshot in another.
    """

    def __init__(
        self,
        total: int,
        shards: int,
        reused: int = 0,
        live: Callable[[], EngineCounts] = no_engine,
        clock: Callable[[], float] = time.monotonic,
        window_seconds: float = 30.0,
    ):
        self.total, self.shards, self.live, self.clock = total, shards, live, clock
        self.baseline = live()
        self.window = RateWindow(window_seconds)
        self.lock = threading.Lock()
        self.ended = False
        # from finished shards: exact
        self.shards_finished = 0
        self.shard_done = self.shard_failed = self.shard_prompt_tokens = self.shard_generated_tokens = 0
        self.cached = reused
        # what was last shown: a count never goes back
        self.shown = {"done": 0, "failed": 0, "prompt_tokens": 0, "generated_tokens": 0}

    def engine_starting(self) -> bool:
        """Whether the process's engine is being built now (never, when the engine is elsewhere)."""
        return self.live().starting

    def shard_finished(self, output: ShardOutput, cached: bool) -> None:
        with self.lock:
            self.shards_finished += 1
            if cached:
                self.cached += output.requests
                return
            self.shard_done += output.requests - output.errors
            self.shard_failed += output.errors
            self.shard_prompt_tokens += output.prompt_tokens
            self.shard_generated_tokens += output.completion_tokens

    def end(self) -> ProgressSnapshot:
        """The final counts: the shards' own, whatever the engine counted (a shard retried after an
        engine death had some requests answered twice)."""
        with self.lock:
            self.ended = True
            self.shown = {
                "done": self.shard_done,
                "failed": self.shard_failed,
                "prompt_tokens": self.shard_prompt_tokens,
                "generated_tokens": self.shard_generated_tokens,
            }
        return self.snapshot()

    def snapshot(self) -> ProgressSnapshot:
        live = self.live()
        with self.lock:
            now = self.clock()
            if not self.ended:
                gained = {
                    "done": live.answered - self.baseline.answered,
                    "failed": live.failed - self.baseline.failed,
                    "prompt_tokens": live.prompt_tokens - self.baseline.prompt_tokens,
                    "generated_tokens": live.generated_tokens - self.baseline.generated_tokens,
                }
                exact = {
                    "done": self.shard_done,
                    "failed": self.shard_failed,
                    "prompt_tokens": self.shard_prompt_tokens,
                    "generated_tokens": self.shard_generated_tokens,
                }
                for name in self.shown:
                    self.shown[name] = max(self.shown[name], exact[name], gained[name])
                # a shard retried after an engine death may have had requests answered twice: never past the total
                self.shown["failed"] = min(self.shown["failed"], self.total - self.cached)
                self.shown["done"] = min(self.shown["done"], self.total - self.cached - self.shown["failed"])
            done, failed = self.shown["done"], self.shown["failed"]
            remaining = max(0, self.total - done - failed - self.cached)
            running = 0 if self.ended else min(live.running, remaining)
            self.window.add(now, done + failed, self.shown["generated_tokens"])
            rates = self.window.rates()
            return ProgressSnapshot(
                total=self.total,
                done=done,
                cached=self.cached,
                failed=failed,
                running=running,
                queued=remaining - running,
                prompt_tokens=self.shown["prompt_tokens"],
                generated_tokens=self.shown["generated_tokens"],
                shards=self.shards,
                shards_finished=self.shards_finished,
                requests_per_second=rates[0] if rates else None,
                tokens_per_second=rates[1] if rates else None,
                eta_seconds=eta_seconds(remaining, rates[0] if rates else None),
                ended=self.ended,
            )
