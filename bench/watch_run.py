"""Issue 18: a 20k-request batch watched through Prometheus and the dashboard page, against its dry run.

1. 20,000 unique short chat lines (max_tokens 16): bench_inference's batch file, for the served name.
2. The dry run on that file, as the server will run it (`vbf run --dry-run --sample 48`), on a results
   file and storage of its own; its estimate read from --summary-json.
3. `vbf serve --metrics-port P` and a real Prometheus scraping P every second; the file goes in as one
   batch through the official `openai` SDK, so the page and Prometheus watch the same run.
4. While it runs: a headless-chromium screenshot of `/` every 10 s, Prometheus asked over its HTTP
   API, and every second the batch object and the page itself (its progress cell, which follows the
   run's live progress file). After it: every scrape of the done counter, read back, and the page's
   readings give the longest stretch progress stood still while the engine answered (the issue's
   bar: 5 s); the main series' last values.
5. The estimate against the real run: the counts (equal), the tokens, the engine time (with the ratio).

    PYTHONPATH=. nice -n 19 .venv/bin/python -m bench.watch_run [--requests 20000] [--max-tokens 16] [--out results/watch-run]

Screenshots, logs and the results files stay in a new folder under --out.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import duckdb
import yaml

from bench.batch_api import free_port, rewrite_model
from bench.bench_inference import write_inputs
from bench.common import ENGINE_ARGS, MODEL, VBF, build_tiny_model, create_prefect_database, prefect_env
from tasks.config import openai_batch_dataset

SERVED = "tiny-llama"
SHOT_EVERY = 10.0  # seconds between screenshots of the page
STALL_TARGET = 5.0  # the issue's bar: progress seen moving at least every 5 s


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sample", type=int, default=48, help="the dry run's sample")
    parser.add_argument("--out", default="results/watch-run")
    return parser.parse_args()


# ---------------------------------------------------------------- processes


def wait_until_listening(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)


def start_prometheus(folder: Path, target: int) -> tuple[subprocess.Popen, str]:
    """As tests/flows/test_monitoring.py: Debian's prometheus scraping the run's metrics port every second."""
    port, config, log = free_port(), folder / "prometheus.yml", folder / "prometheus.log"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: vbf, static_configs: [{{targets: ['127.0.0.1:{target}']}}]}}]\n"
    )
    command = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}"]
    with log.open("w") as out:
        server = subprocess.Popen([*command, f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=out)
    wait_until_listening(server, port, log)
    return server, f"http://127.0.0.1:{port}"


def start_server(folder: Path, model_yaml: Path, metrics_port: int, env: dict) -> tuple[subprocess.Popen, int]:
    port, log = free_port(), folder / "serve.log"
    command = [VBF, "serve", "--port", str(port), "--folder", str(folder / "service"), "--model", f"{SERVED}={model_yaml}"]
    command += ["--duckdb", str(folder / "results.duckdb"), "--storage", str(folder / "storage")]
    with log.open("w") as out:
        server = subprocess.Popen([*command, "--metrics-port", str(metrics_port)], env=env, stdout=out, stderr=out)
    wait_until_listening(server, port, log)
    return server, port


def screenshot(url: str, path: Path, profile: Path) -> None:
    """As the dashboard test: headless chromium, 1280 px wide."""
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    command += [f"--screenshot={path}", "--window-size=1280,900", url]
    subprocess.run(command, capture_output=True, timeout=120, check=True)


# ---------------------------------------------------------------- Prometheus


def prom(url: str, promql: str) -> list[dict]:
    query = urllib.parse.urlencode({"query": promql})
    answer = json.load(urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def value(url: str, promql: str) -> float | None:
    result = prom(url, promql)
    return float(result[0]["value"][1]) if result else None


def shown(number: float | None, spec: str) -> str:
    return "-" if number is None else format(number, spec)


def longest_still(points: list[tuple[float, float]], final: float) -> tuple[float, float, float]:
    """(seconds, from, count): the longest time the count stood still between its first move and its final
    value, in (time, count) points oldest first. A missed scrape hides nothing: the same count before and
    after it is a stretch without progress."""
    moving = [(t, v) for t, v in points if v > 0]
    moving = moving[: next(i for i, (_, v) in enumerate(moving) if v >= final) + 1]
    longest, since = (0.0, moving[0][0], moving[0][1]), moving[0]
    for t, v in moving[1:]:
        if v != since[1]:
            since = (t, v)
        if t - since[0] > longest[0]:
            longest = (t - since[0], since[0], v)
    return longest


# ---------------------------------------------------------------- the run


def dry_run(folder: Path, spec: Path, model_yaml: Path, sample: int, env: dict) -> tuple[dict, float]:
    command = [VBF, "run", "--spec", str(spec), "--model", str(model_yaml), "--dry-run", "--sample", str(sample)]
    command += ["--duckdb", str(folder / "results.duckdb"), "--storage", str(folder / "storage")]
    started = time.perf_counter()
    done = subprocess.run([*command, "--summary-json", str(folder / "estimate.json")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "estimate.json").read_text()), time.perf_counter() - started


def page_percent(page: str, batch_id: str) -> float:
    """The progress cell of the batch's row on the page, as a browser gets it (0 before it shows one)."""
    html = urllib.request.urlopen(page, timeout=10).read().decode()
    row = re.search(rf'<tr class="batch" id="{batch_id}">(.*?)</tr>', html, re.S)
    cell = re.search(r'<td class="progress">.*?([\d.]+)%</td>', row[1], re.S) if row else None
    return float(cell[1]) if cell else 0.0


def watch(client, batch_id: str, page: str, prometheus: str, shots: Path) -> tuple[list, list, list[Path]]:
    """Until the batch ends: its counts and the page's progress every second, a screenshot and a printed
    line every SHOT_EVERY s."""
    polled, on_page, taken, shooter, started, next_shot = [], [], [], None, time.monotonic(), 0.0
    while True:
        batch = client.batches.retrieve(batch_id)
        elapsed = time.monotonic() - started
        polled.append((elapsed, batch.request_counts.completed + batch.request_counts.failed))
        on_page.append((elapsed, page_percent(page, batch_id)))
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        if elapsed >= next_shot and (shooter is None or not shooter.is_alive()):
            taken.append(shots / f"page-{elapsed:04.0f}s.png")
            shooter = threading.Thread(target=screenshot, args=(page, taken[-1], shots / "chromium"))
            shooter.start()
            # [1m]: the last scraped values, also in the seconds after the run's process (and its series) ended
            done = value(prometheus, 'last_over_time(vbf_requests_total{state="done"}[1m])')
            eta = value(prometheus, "last_over_time(vbf_eta_seconds[1m])")
            rate = value(prometheus, "rate(vbf_generated_tokens_total[10s])")
            engine = [s["metric"]["state"] for s in prom(prometheus, "last_over_time(vbf_engine_state[1m]) == 1")]
            print(
                f"  {elapsed:5.0f} s  {batch.status:<11} committed {polled[-1][1]:>6,}/{batch.request_counts.total:,}"
                f" page {on_page[-1][1]:5.1f}%"
                f"   Prometheus: done {shown(done, ',.0f'):>6}, ETA {shown(eta, '.0f'):>4} s, {shown(rate, '.0f'):>5} tokens/s,"
                f" engine {'/'.join(engine) or '-'}",
                flush=True,
            )
            next_shot = elapsed + SHOT_EVERY
        time.sleep(1.0)
    if shooter is not None:
        shooter.join()
    taken.append(shots / "page-final.png")
    screenshot(page, taken[-1], shots / "chromium")
    assert batch.status == "completed", batch
    return polled, on_page, taken


def run_row(results: Path) -> dict:
    with duckdb.connect(str(results), read_only=True) as con:
        (row,) = con.execute("SELECT * FROM runs").fetchdf().to_dict("records")
    return {**row, "generate": json.loads(row["stage_seconds"])["generate"]}


FINAL = [  # the main series, as a dashboard would end on them
    'vbf_requests_total{state="done"}',
    'vbf_requests_total{state="failed"}',
    'vbf_requests_total{state="cached"}',
    "vbf_run_requests",
    "vbf_prompt_tokens_total",
    "vbf_generated_tokens_total",
    "vbf_eta_seconds",
    "vbf_run_ended",
]


def final_series(url: str) -> dict[str, float | str | None]:
    """The last scraped value of each (the run's process has ended, its series are stale), the engine's state."""
    values: dict[str, float | str | None] = {name: value(url, f"last_over_time({name}[30m])") for name in FINAL}
    states = prom(url, "last_over_time(vbf_engine_state[30m]) == 1")
    values["vbf_engine_state (the one at 1)"] = ", ".join(s["metric"]["state"] for s in states) or None
    values["max of rate(vbf_generated_tokens_total[10s])"] = value(
        url, "max_over_time(rate(vbf_generated_tokens_total[10s])[30m:1s])"
    )
    return values


def main() -> None:
    import openai

    args = arguments()
    for tool in ("prometheus", "chromium"):
        assert shutil.which(tool), f"no {tool}: Debian's `{tool}` package (make system-packages)"
    folder = Path(args.out).resolve() / time.strftime("%Y%m%d-%H%M%S")
    (folder / "dry").mkdir(parents=True)
    (folder / "screenshots").mkdir()
    build_tiny_model()
    env = prefect_env(folder)
    create_prefect_database(folder)
    _, _, batch_file = write_inputs(folder, args.requests, args.max_tokens)
    batch_file = rewrite_model(batch_file, folder / f"batch-{SERVED}.jsonl", SERVED)
    model_yaml = folder / "model.yaml"
    model_yaml.write_text(yaml.safe_dump({"model": str(MODEL), **ENGINE_ARGS}))
    spec = folder / "dry" / "dataset.yaml"  # what the server writes for the batch's run (tasks/service/launchers.py)
    dataset = openai_batch_dataset(str(batch_file), "watch-run")
    spec.write_text(yaml.safe_dump(dataset.model_dump(mode="json", exclude_defaults=True)))

    estimate, dry_wall = dry_run(folder / "dry", spec, model_yaml, args.sample, env)
    print(f"dry run (--sample {args.sample}) took {dry_wall:.1f} s", flush=True)

    metrics_port = free_port()
    prometheus, prometheus_url = start_prometheus(folder, metrics_port)
    server, port = start_server(folder, model_yaml, metrics_port, env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0)
        uploaded = client.files.create(file=batch_file.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        print(f"batch {batch.id}: {args.requests:,} lines; the page at http://127.0.0.1:{port}/", flush=True)
        polled, on_page, shots = watch(client, batch.id, f"http://127.0.0.1:{port}/", prometheus_url, folder / "screenshots")
        batch = client.batches.retrieve(batch.id)
        real = run_row(folder / "results.duckdb")
        scraped = prom(prometheus_url, 'vbf_requests_total{state="done"}[30m]')[0]["values"]
        final = final_series(prometheus_url)
    finally:
        server.terminate()
        server.wait(timeout=60)
        prometheus.terminate()
        prometheus.wait(timeout=30)

    scraped = [(float(t), float(v)) for t, v in scraped]
    gap, gap_from, gap_count = longest_still(scraped, real["engine_requests"])
    committed_gap, _, committed_count = longest_still(polled, args.requests)
    page_gap, _, page_at = longest_still(on_page, 100.0)
    print("\nPrometheus at the end (last scraped values):")
    for name, shown in final.items():
        print(f"  {name:<46} {shown:,.1f}" if isinstance(shown, float) else f"  {name:<46} {shown}")
    rows = [
        ("rows read", estimate["rows_read"], real["rows_read"]),
        ("rejected", estimate["rejected"], real["rejected"]),
        ("duplicates", estimate["duplicates"], real["duplicates"]),
        ("unique requests", estimate["unique_requests"], real["unique_requests"]),
        ("requests to send / sent to the engine", estimate["requests_to_send"], real["engine_requests"]),
        ("prompt tokens", estimate["prompt_tokens"], real["prompt_tokens"]),
        ("output tokens", estimate["expected_output_tokens"], real["completion_tokens"]),
    ]
    print(f"\n{'':<40}{'dry run':>12}{'real':>12}")
    for name, guessed, measured in rows:
        print(f"{name:<40}{guessed:>12,}{measured:>12,}   {'equal' if guessed == measured else f'{guessed / measured:.3f}x'}")
    print(
        f"{'engine time (generate)':<40}{estimate['engine_seconds']:>11.1f}s{real['generate']:>11.1f}s"
        f"   {estimate['engine_seconds'] / real['generate']:.3f}x"
    )
    print(f"{'flow wall (the run alone)':<40}{'':>12}{real['wall_seconds']:>11.1f}s")
    # the batch's life against the run's, in seconds from the batch's creation
    moments = {
        "in progress": batch.in_progress_at,
        "metrics up": scraped[0][0],
        "first answer": next(t for t, v in scraped if v > 0),
        "last answer": next(t for t, v in scraped if v >= real["engine_requests"]),
        "completed": batch.completed_at,
    }
    print("timeline: " + ", ".join(f"{name} {moment - batch.created_at:.0f} s" for name, moment in moments.items()))
    print(
        f"longest stretch without progress while answering: Prometheus {gap:.1f} s ({gap_from - moments['first answer']:.0f} s"
        f" into answering, at {gap_count:,.0f} done; target <= {STALL_TARGET:.0f} s; {len(scraped)} scrapes);"
        f" the page's progress (read every second) {page_gap:.1f} s (at {page_at:.1f}%);"
        f" the batch object's committed counts {committed_gap:.1f} s (at {committed_count:,.0f})"
    )
    print(f"screenshots: {len(shots)} in {folder / 'screenshots'}, the last: {shots[-2].name}, {shots[-1].name}")


if __name__ == "__main__":
    main()
