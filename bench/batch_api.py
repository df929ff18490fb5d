"""The Batch API (`vbf serve`) against vLLM's own batch runner, measured side by side in one run.

1. The same 20k-line chat batch file: through the service with the official `openai` SDK (upload →
   create → poll → download, whole wall, the server already up) vs `python -m
   vllm.entrypoints.openai.run_batch` on it (whole process). Target: service / run_batch <= 1.05.
2. Status polls at 10 per second while that batch runs: p50 and p99 latency (target p99 < 50 ms).
3. A model swap: a small batch for a second model right after the first batch ends (create →
   completed) vs the same small file through `vbf run-batch` from cold, in a fresh process.

    .venv/bin/python -m bench.batch_api [--requests 20000] [--max-tokens 16] [--rounds 1]

Each round runs run_batch first, then the service; with --rounds N medians are reported.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.bench_inference import write_inputs
from bench.common import (
    ENGINE_ARGS,
    MODEL,
    VBF,
    build_tiny_model,
    chat_batch_arguments,
    create_prefect_database,
    prefect_env,
    timed,
    vllm_run_batch,
)

SMALL_BATCH = 50


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, env: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    models = []
    for name, seed in (("tiny-llama", 0), ("tiny-seed7", 7)):
        config = folder / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"model": str(MODEL), **ENGINE_ARGS, "seed": seed}))
        models += ["--model", f"{name}={config}"]
    store = ["--duckdb", str(folder / "results.duckdb"), "--storage", str(folder / "storage")]
    command = [VBF, "serve", "--port", str(port), "--folder", str(folder / "service"), *store, *models]
    with open(folder / "serve.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            assert server.poll() is None, (folder / "serve.log").read_text()[-2000:]
            time.sleep(0.2)


def rewrite_model(source: Path, target: Path, model: str, lines: int | None = None) -> Path:
    with source.open() as src, target.open("w") as out:
        for number, line in enumerate(src):
            if lines is not None and number >= lines:
                break
            record = json.loads(line)
            record["body"]["model"] = model
            out.write(json.dumps(record) + "\n")
    return target


def run_through_service(client, path: Path, polls: list[tuple] | None = None) -> tuple[float, dict]:
    """Upload → create → poll until it ends → download both files; returns the wall and the batch.
    With `polls`, a second thread polls at 10/s and records each poll: (seconds since the batch was
    created, latency, the status and completed count it got)."""
    started = time.perf_counter()
    file = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    stop = threading.Event()
    created = time.perf_counter()
    if polls is not None:  # a second client polling at 10/s, as a dashboard would

        def poll() -> None:
            while not stop.wait(0.1):
                before = time.perf_counter()
                seen = client.batches.retrieve(batch.id)
                polls.append((before - created, time.perf_counter() - before, seen.status, seen.request_counts.completed))

        poller = threading.Thread(target=poll)
        poller.start()
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    stop.set()
    assert batch.status == "completed", batch
    output = client.files.content(batch.output_file_id).text
    errors = client.files.content(batch.error_file_id).text if batch.error_file_id else ""
    wall = time.perf_counter() - started
    assert output.count("\n") + errors.count("\n") == batch.request_counts.total, "not one line per input line"
    return wall, batch.model_dump()


def one_round(folder: Path, batch: Path, small: Path, round_index: int) -> dict:
    import openai

    env = prefect_env(folder)
    run_batch_wall = timed(vllm_run_batch(batch, folder / f"run-batch-out-{round_index}.jsonl", "tiny-llama"), env)
    service_dir = folder / f"service-{round_index}"
    service_dir.mkdir()
    server, port = start_server(service_dir, env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0)
        polls: list[tuple] = []
        service_wall, _ = run_through_service(client, batch, polls)
        swap_wall, _ = run_through_service(client, small)
    finally:
        server.terminate()
        server.wait(timeout=60)
    cold_dir = folder / f"cold-{round_index}"
    cold_wall = timed(
        [VBF, "run-batch", "-i", str(small), "-o", str(cold_dir / "out.jsonl"), "--model", str(service_dir / "tiny-seed7.yaml")]
        + ["--duckdb", str(cold_dir / "results.duckdb"), "--storage", str(cold_dir / "storage")],
        env,
    )
    latencies = sorted(latency for _, latency, _, _ in polls)
    print("  the slowest polls (seconds after create, ms, status, completed):", flush=True)
    for at, latency, status, completed in sorted(polls, key=lambda poll: -poll[1])[:12]:
        print(f"    {at:7.1f} s  {1000 * latency:7.1f} ms  {status:<11} {completed:>6}", flush=True)
    return {
        "run_batch_wall": run_batch_wall,
        "service_wall": service_wall,
        "poll_p50_ms": 1000 * latencies[len(latencies) // 2],
        "poll_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "polls": len(latencies),
        "swap_wall": swap_wall,
        "cold_wall": cold_wall,
    }


def main() -> None:
    args = chat_batch_arguments(__doc__)
    build_tiny_model()
    with tempfile.TemporaryDirectory(prefix="bench-batch-api-") as tmp:
        folder = Path(tmp)
        create_prefect_database(folder)
        _, _, batch = write_inputs(folder, args.requests, args.max_tokens)
        batch = rewrite_model(batch, folder / "batch-tiny-llama.jsonl", "tiny-llama")
        small = rewrite_model(batch, folder / "small-tiny-seed7.jsonl", "tiny-seed7", lines=SMALL_BATCH)
        rounds = []
        for index in range(args.rounds):
            rounds.append(one_round(folder, batch, small, index))
            print(json.dumps(rounds[-1]), flush=True)
    median = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    print(f"\n{args.requests} chat requests, max_tokens {args.max_tokens}, {args.rounds} round(s), medians:")
    print(f"  vLLM run_batch, whole process           {median('run_batch_wall'):7.1f} s")
    print(f"  vbf serve: upload, create, poll, download {median('service_wall'):7.1f} s")
    print(f"  service / run_batch                     {median('service_wall') / median('run_batch_wall'):.3f}   (target <= 1.05)")
    print(
        f"  status polls at 10/s while it ran: p50 {median('poll_p50_ms'):.1f} ms, p99 {median('poll_p99_ms'):.1f} ms (target p99 < 50 ms)"
    )
    print(
        f"  {SMALL_BATCH}-line batch on a second model right after: {median('swap_wall'):.1f} s; cold vbf run-batch: {median('cold_wall'):.1f} s"
    )
    print(f"  swap / cold                             {median('swap_wall') / median('cold_wall'):.3f}")


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
