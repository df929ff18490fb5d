"""A real Prometheus server scrapes `vbf run --metrics-port` on the tiny model, and is asked over its HTTP API
while the run goes and after it ends."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.cluster import free_port

REPO = Path(__file__).resolve().parents[2]
VBF = Path(sys.executable).with_name("vbf")
# The engine answers in waves of up to max_num_seqs (256) requests of 32 tokens, a wave every second or so
# here: 8,000 requests keep the count moving for many scrapes, in 4 shards of 2,048 (1,024 is the default).
REQUESTS = 8000
SHARD_SIZE = 2048
STALL_SECONDS = 5.0  # the bar: progress seen moving at least every 5 s

pytestmark = pytest.mark.slow


@pytest.fixture
def prometheus(tmp_path):
    """Prometheus on 127.0.0.1 scraping a metrics port every second; yields (its URL, the port it scrapes)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary: install Debian's `prometheus` package (`make system-packages`)")
    target, port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: vbf, static_configs: [{{targets: ['127.0.0.1:{target}']}}]}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield url, target
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def query(url: str, promql: str) -> dict[str, float]:
    """An instant query's result: each series' labels (as `key=value,...`) → its value."""
    answer = json.load(urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=10))
    assert answer["status"] == "success", answer
    return {
        ",".join(f"{k}={v}" for k, v in sorted(series["metric"].items()) if k not in ("job", "instance")): float(
            series["value"][1]
        )
        for series in answer["data"]["result"]
    }


def one(url: str, promql: str) -> float | None:
    values = list(query(url, promql).values())
    assert len(values) <= 1, values
    return values[0] if values else None


def samples(url: str, promql: str) -> list[tuple[float, float]]:
    """Every sample Prometheus scraped of one series, (time, value), oldest first: `promql` is a range selector."""
    answer = json.load(urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=10))
    assert answer["status"] == "success", answer
    (series,) = answer["data"]["result"]
    return [(float(t), float(v)) for t, v in series["values"]]


def longest_stall(scraped: list[tuple[float, float]], final: float) -> tuple[float, int]:
    """While the count moves (from its first answer to its final value): the longest time two scrapes saw the
    same count, and how many counts were seen in between. A scrape that failed (the machine busy) hides nothing
    here: a count seen before and after it is a stall, a count that changed across it is not."""
    moving = [(t, v) for t, v in scraped if v > 0]
    moving = moving[: next(i for i, (_, v) in enumerate(moving) if v >= final) + 1]
    stall, since = 0.0, moving[0]
    for t, v in moving[1:]:
        if v != since[1]:
            since = (t, v)
        stall = max(stall, t - since[0])
    return stall, len({v for _, v in moving if v < final})


def test_prometheus_sees_a_run_move_and_end_at_the_stored_counts(prometheus, tiny_model_dir, tmp_path):
    url, metrics_port = prometheus
    source = tmp_path / "questions.parquet"
    prompts = [f"Question {i}: what comes after {i} and before {i + 2}?" for i in range(REQUESTS)]
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(REQUESTS)], "prompt": prompts}), source)
    results = tmp_path / "results.duckdb"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    command = [str(VBF), "run", str(source), "--prompt-column", "prompt", "--id-column", "id", "--max-tokens", "32"]
    command += ["--shard-size", str(SHARD_SIZE)]
    command += ["--duckdb", str(results), "--storage", str(tmp_path / "storage"), "--metrics-port", str(metrics_port)]
    log = tmp_path / "run.log"  # a file, not a pipe: a pipe nobody reads while the run goes could stall it
    with log.open("w") as output:
        run = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)

    # While the run goes, Prometheus is asked every half second; `last_over_time` keeps a value through one
    # failed scrape (a failed scrape marks the series stale, and an instant query then finds nothing).
    during = {
        "done": 'last_over_time(vbf_requests_total{state="done"}[3s])',
        "eta": "last_over_time(vbf_eta_seconds[3s])",
        "total": "last_over_time(vbf_run_requests[3s])",
        "ready": 'last_over_time(vbf_engine_state{state="ready"}[3s])',
        "vllm_running": 'last_over_time(vbf_engine_requests{state="running"}[3s])',
        "kv_cache": "last_over_time(vbf_engine_kv_cache_usage_ratio[3s])",
    }
    seen: dict[str, list[float]] = {name: [] for name in during}
    try:
        deadline = time.monotonic() + 300
        while run.poll() is None:
            assert time.monotonic() < deadline, "the run did not end in time"
            if (ended := one(url, "last_over_time(vbf_run_ended[3s])")) is None or ended == 0:  # in progress
                for name, promql in during.items():
                    if (value := one(url, promql)) is not None:
                        seen[name].append(value)
            time.sleep(0.5)
    finally:
        if run.poll() is None:
            run.kill()
    output = log.read_text()
    assert run.returncode == 0, output[-3000:]
    answered_while_running = [value for value in seen["done"] if value > 0]
    assert answered_while_running, f"Prometheus never saw the run move before it ended: {output[-3000:]}"
    print(
        f"during the run: done {answered_while_running[0]:.0f} to {answered_while_running[-1]:.0f} in "
        f"{len(answered_while_running)} queries; ETA {seen['eta'][-1:]} s; total {seen['total'][-1:]}; engine ready "
        f"{max(seen['ready'], default=None)}; vLLM running {max(seen['vllm_running'], default=None)}; KV cache {seen['kv_cache'][-1:]}"
    )
    assert seen["total"] and set(seen["total"]) == {REQUESTS}
    assert seen["eta"] and min(seen["eta"]) >= 0
    assert (
        1 in seen["ready"]
        and seen["vllm_running"]
        and seen["kv_cache"]
        and 0 <= min(seen["kv_cache"]) <= max(seen["kv_cache"]) <= 1
    )
    # piped, the terminal's progress is a plain line every few seconds, counting requests
    assert f"/{REQUESTS:,} requests" in output

    # After the run: its process is gone (its series are stale now), the last scraped values are the final counts.
    final = {
        state: one(url, f'last_over_time(vbf_requests_total{{state="{state}"}}[5m])') for state in ("done", "cached", "failed")
    }
    ended = one(url, "last_over_time(vbf_run_ended[5m])")
    with duckdb.connect(str(results), read_only=True) as con:
        unique, errors, run_id = con.execute("SELECT unique_requests, errors, run_id FROM runs").fetchone()
        answered = con.execute("SELECT count(DISTINCT custom_id) FROM outputs WHERE error_code IS NULL").fetchone()[0]
    print(f"after the run: {final}, ended {ended}; stored: {unique} unique requests, {answered} answered, {errors} errors")
    assert ended == 1
    assert final == {"done": answered, "cached": 0, "failed": errors}
    assert final["done"] + final["failed"] == unique == REQUESTS
    assert query(url, "last_over_time(vbf_run_info[5m])")  # the run's labels
    assert run_id in "".join(query(url, "last_over_time(vbf_run_info[5m])"))

    # By the request, not by the shard, and never still for long: every scrape of the run, read back. Counted
    # by the shard, the count would take at most 3 values between 0 and the total (4 shards).
    stall, counts = longest_stall(samples(url, 'vbf_requests_total{state="done"}[15m]'), final["done"])
    print(f"done moved through {counts} counts before its final one; the longest stall between scrapes: {stall:.1f} s")
    assert counts > REQUESTS // SHARD_SIZE
    assert stall <= STALL_SECONDS
