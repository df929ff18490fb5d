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
REQUESTS = 3000

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
    command += ["--duckdb", str(results), "--storage", str(tmp_path / "storage"), "--metrics-port", str(metrics_port)]
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    done = 'vbf_requests_total{state="done"}'
    try:
        deadline = time.monotonic() + 150
        first = None
        while first is None or first <= 0:  # the first answers scraped while the run goes
            assert run.poll() is None, f"the run ended before Prometheus saw it move: {run.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no answers scraped in time"
            time.sleep(0.5)
            first = one(url, done)
        time.sleep(3)
        second = one(url, done)
        eta = one(url, "vbf_eta_seconds")
        total = one(url, "vbf_run_requests")
        ready = one(url, 'vbf_engine_state{state="ready"}')
        vllm_running = one(url, 'vbf_engine_requests{state="running"}')
        kv_cache = one(url, "vbf_engine_kv_cache_usage_ratio")
        output, _ = run.communicate(timeout=150)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-3000:]
    print(
        f"during the run: done {first:.0f} then {second:.0f} 3 s later; ETA {eta} s; total {total:.0f}; engine ready {ready}; "
        f"vLLM running {vllm_running}; KV cache {kv_cache}"
    )

    assert second > first  # moving while the run goes, not only at its end
    assert total == REQUESTS
    assert eta is not None and eta >= 0
    assert ready == 1 and vllm_running is not None and kv_cache is not None and 0 <= kv_cache <= 1
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
