"""A run's progress by the request: rate, ETA, and counts from shards and the live engine (pure)."""

import pytest

from tasks.engines.loop import EngineCounts
from tasks.inference.job import ShardOutput
from tasks.report.progress import RateWindow, RunProgress, eta_seconds, format_line


def shard(requests: int, errors: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0) -> ShardOutput:
    return ShardOutput(
        shard_key="s",
        output_key="o",
        path="p",
        requests=requests,
        outputs=requests,
        errors=errors,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        generate_seconds=1.0,
        batch_size=requests,
        max_num_seqs=8,
        engine_load_seconds=0.0,
        engine_requests=requests - errors,
    )


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_spans_the_window_and_the_eta_follows_the_recent_rate():
    window = RateWindow(seconds=10)
    assert window.rates() is None
    window.add(0, 0, 0)
    window.add(5, 0, 0)
    assert window.rates() is None  # nothing finished yet: no rate, no ETA
    for t in range(6, 31):
        window.add(t, (t - 5) * 20, (t - 5) * 200)  # 20 requests and 200 tokens a second from t=5
    requests_per_second, tokens_per_second = window.rates()
    assert requests_per_second == pytest.approx(20.0)
    assert tokens_per_second == pytest.approx(200.0)
    assert eta_seconds(400, requests_per_second) == pytest.approx(20.0)
    assert eta_seconds(0, None) == 0.0
    assert eta_seconds(5, None) is None


def test_counts_come_from_the_engine_live_and_from_shards_and_never_go_back():
    clock, engine = Clock(), {"counts": EngineCounts(answered=50, failed=1, prompt_tokens=500, generated_tokens=900)}
    progress = RunProgress(total=100, shards=4, reused=10, live=lambda: engine["counts"], clock=clock)
    start = progress.snapshot()  # what the engine did for earlier runs of the process is not this run's
    assert (start.done, start.cached, start.failed, start.queued, start.eta_seconds) == (0, 10, 0, 90, None)

    clock.now += 10
    engine["counts"] = EngineCounts(answered=80, failed=3, prompt_tokens=800, generated_tokens=1500, running=7)
    live = progress.snapshot()
    assert (live.done, live.failed, live.running, live.queued) == (30, 2, 7, 90 - 32 - 7)
    assert live.generated_tokens == 600
    assert live.requests_per_second == pytest.approx(3.2)
    assert live.eta_seconds == pytest.approx(58 / 3.2)

    progress.shard_finished(shard(20), cached=True)  # a cached shard: its requests were never in the engine
    progress.shard_finished(shard(40, errors=4, prompt_tokens=400, completion_tokens=700), cached=False)
    clock.now += 10
    later = progress.snapshot()
    assert (later.done, later.cached, later.failed) == (36, 30, 4)  # the shard knew more than the engine's count
    assert later.generated_tokens == 700
    assert later.shards_finished == 2

    engine["counts"] = EngineCounts(answered=50, failed=1)  # a count read behind another never moves back
    assert progress.snapshot().done == 36

    progress.shard_finished(shard(30, errors=1, prompt_tokens=300, completion_tokens=500), cached=False)
    final = progress.end()  # the shards' counts are the truth at the end
    assert (final.done, final.cached, final.failed, final.running, final.queued) == (65, 30, 5, 0, 0)
    assert (final.prompt_tokens, final.generated_tokens, final.eta_seconds, final.ended) == (700, 1200, 0.0, True)
    assert final.finished == final.total


def test_a_count_never_passes_the_runs_total():
    engine = {"counts": EngineCounts()}
    progress = RunProgress(total=10, shards=1, live=lambda: engine["counts"], clock=Clock())
    engine["counts"] = EngineCounts(answered=15)  # a shard retried after an engine death: requests answered twice
    assert progress.snapshot().done == 10


def test_the_plain_line_says_count_share_speed_and_eta():
    clock, engine = Clock(), {"counts": EngineCounts()}
    progress = RunProgress(total=3000, shards=3, live=lambda: engine["counts"], clock=clock)
    assert format_line(progress.snapshot()) == "0/3,000 requests (0%) · - tokens/s · ETA -"
    clock.now += 10
    engine["counts"] = EngineCounts(answered=1200, failed=3, generated_tokens=4100)
    assert format_line(progress.snapshot()) == "1,203/3,000 requests (40%), 3 failed · 410 tokens/s · ETA 0:15"
