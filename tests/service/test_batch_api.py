"""`vbf serve`, the OpenAI Batch API, driven by the official `openai` SDK against a real server process.

The door: API keys (401 without one, each key blind to another's objects, revoked keys refused, an
audit trail), uploads refused whole with OpenAI-style errors naming the line and leaving nothing
behind (no batch there reaches an engine: one whose lines name no served model fails validation).
Batches that run: to completed (through a SIGKILL of the server), cancelled or expired keeping what
finished, on a second model; every line of the files is checked against OpenAI's shapes and the
results file. Each batch's run is a real `vbf run` process on the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import openai
import psutil
import pytest
import yaml
from openai.types.chat import ChatCompletion

ROOT = Path(__file__).resolve().parents[2]
VBF = str(Path(sys.executable).parent / "vbf")
ENDED = ("completed", "failed", "expired", "cancelled")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`vbf serve` in its own process, on its own folder and results file; restartable on the same ones."""

    def __init__(self, folder: Path, *flags: str):
        self.folder, self.flags, self.port = folder, flags, free_port()
        self.env = {**os.environ, "PREFECT_HOME": str(folder / "prefect"), "PREFECT_API_URL": ""}
        # Prefect's temporary server (of a Secret's save here) gets 20 s to start by default: not enough on a loaded machine
        self.env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        args = ["serve", "--port", str(self.port), "--folder", str(self.folder / "service"), *self.store_flags(), *self.flags]
        with open(self.folder / "serve.log", "a") as log:
            self.process = subprocess.Popen([VBF, *args], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.process.poll() is None, (self.folder / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "vbf serve did not listen within 120 s"
                time.sleep(0.3)

    def store_flags(self) -> list[str]:
        return ["--duckdb", str(self.folder / "results.duckdb"), "--storage", str(self.folder / "storage")]

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)

    def vbf(self, *args: str) -> str:
        done = subprocess.run(
            [VBF, *args, "--folder", str(self.folder / "service")], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def chat_line(custom_id: str, text: str, model: str = "tiny-llama", **body) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 6, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(client: openai.OpenAI, path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return client.files.create(file=path.open("rb"), purpose="batch").id


def wait_for(client: openai.OpenAI, batch_id: str, until, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert batch.status not in ENDED, f"batch ended {batch.status} before the condition: {batch}"
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout:.0f} s"
        time.sleep(0.5)


def ended_files(client: openai.OpenAI, batch) -> tuple[list[dict], list[dict]]:
    """The output and error lines; each line is OpenAI's shape: exactly one of response and error."""
    read = lambda file_id: [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []  # noqa: E731
    output, errors = read(batch.output_file_id), read(batch.error_file_id)
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        ChatCompletion.model_validate(line["response"]["body"])  # the SDK's own model of the body
    for line in errors:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["response"] is None
        assert set(line["error"]) == {"code", "message"}
    assert batch.request_counts.completed == len(output) and batch.request_counts.failed == len(errors)
    return output, errors


def results(server: Server, sql: str, *params) -> list[tuple]:
    """A query on the server's results file, closed at once: the next batch's run writes it."""
    with duckdb.connect(str(server.folder / "results.duckdb"), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def model_yaml(folder: Path, name: str, tiny_model_dir: Path, seed: int) -> str:
    path = folder / f"{name}.yaml"
    model = {"model": str(tiny_model_dir), "max_model_len": 1024, "gpu_memory_utilization": 0.1, "seed": seed}
    model["enforce_eager"] = True  # as the in-process tiny model: compiling would cost each engine start ~20 s
    path.write_text(yaml.safe_dump(model))
    return f"{name}={path}"


# ---------------------------------------------------------------- the door: keys and uploads (no engine)

BAD_UPLOADS = {
    "not JSON": (b'{"custom_id": "a"\n', 400, "invalid_json_line", "line 1"),
    "not UTF-8": (
        json.dumps(chat_line("a", "Hi")).encode() + b"\n" + b'{"custom_id": "\xff\xfe"}\n',
        400,
        "invalid_encoding",
        "line 2",
    ),
    "line too long": (json.dumps(chat_line("a", "x" * 5000)).encode() + b"\n", 400, "line_too_long", "line 1"),
    "duplicate custom_id": (
        b"".join(json.dumps(chat_line(i, "Hi")).encode() + b"\n" for i in ("a", "b", "a")),
        400,
        "duplicate_custom_id",
        "line 3",
    ),
    "unknown endpoint": (
        json.dumps({**chat_line("a", "Hi"), "url": "/v1/embeddings"}).encode() + b"\n",
        400,
        "invalid_url",
        "line 1",
    ),
    "over the size limit": (
        b"".join(json.dumps(chat_line(f"id{i}", "Hi there")).encode() + b"\n" for i in range(400)),
        413,
        "file_too_large",
        "",
    ),
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("keyed"), "--max-line-bytes", "4096", "--max-file-bytes", "20000")
    keys = [re.search(r"(key_\w+) \(\w+\): (\S+)", server.vbf("keys", "create", name)).groups() for name in ("alice", "bob")]
    server.start()
    yield server, dict(zip(("alice", "bob"), keys))
    server.stop()


def test_without_a_valid_key_every_call_is_401(keyed):
    server, _ = keyed
    bare = httpx.get(f"http://127.0.0.1:{server.port}/v1/batches")  # no Authorization header at all
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as refused:
        server.client("vbf-wrong").batches.list()
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"


def test_each_key_sees_only_its_own_files_and_batches_and_a_revoked_key_is_refused(keyed, tmp_path):
    server, keys = keyed
    alice, bob = server.client(keys["alice"][1]), server.client(keys["bob"][1])
    file_id = upload(alice, tmp_path / "alice.jsonl", [chat_line("a1", "Hi", model="not-served")])
    batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_for(alice, batch.id, lambda b: b.status == "failed", timeout=60)
    assert failed.errors.data[0].code == "model_not_found" and failed.failed_at

    for call in (lambda: bob.files.retrieve(file_id), lambda: bob.files.content(file_id), lambda: bob.batches.retrieve(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):  # nor can bob start a batch on alice's file
        bob.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert [b.id for b in bob.batches.list()] == [] and [f.id for f in bob.files.list()] == []
    assert [b.id for b in alice.batches.list()] == [batch.id] and [f.id for f in alice.files.list()] == [file_id]

    alice_id, bob_id = keys["alice"][0], keys["bob"][0]
    expected = [f"{alice_id}  batch.created  {batch.id}", f"{bob_id}  batch.read  {batch.id}"]
    deadline = time.monotonic() + 10  # reads reach the audit table within AUDIT_SECONDS
    while not all(line in (audit := server.vbf("keys", "audit", "--limit", "200")) for line in expected):
        assert time.monotonic() < deadline, audit
        time.sleep(0.5)

    assert alice.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(file_id)
    server.vbf("keys", "revoke", alice_id)
    with pytest.raises(openai.AuthenticationError):
        alice.batches.list()
    assert bob.batches.list().data == []  # the other key still works


def test_batches_page_newest_first_with_after_and_limit(keyed, tmp_path):
    server, keys = keyed
    bob = server.client(keys["bob"][1])
    file_id = upload(bob, tmp_path / "bob.jsonl", [chat_line("b1", "Hi", model="not-served")])
    created = [
        bob.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id for _ in range(5)
    ]
    first = bob.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2] and first.has_more
    rest = bob.batches.list(limit=10, after=first.data[-1].id)
    assert [b.id for b in rest.data] == created[::-1][2:] and not rest.has_more
    assert [b.id for b in bob.batches.list(limit=2)] == created[::-1]  # iterating, the SDK pages on by itself


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_is_refused_whole_naming_its_line_and_leaves_nothing(keyed, case):
    server, keys = keyed
    content, status, code, where = BAD_UPLOADS[case]
    before = (
        sorted(p.name for p in (server.folder / "service" / "files").glob("*"))
        if (server.folder / "service" / "files").exists()
        else []
    )
    bob = server.client(keys["bob"][1])
    with pytest.raises(openai.APIStatusError) as refused:
        bob.files.create(file=("requests.jsonl", content), purpose="batch")
    assert refused.value.status_code == status and refused.value.body["code"] == code
    assert where in refused.value.body["message"]
    after = (
        sorted(p.name for p in (server.folder / "service" / "files").glob("*"))
        if (server.folder / "service" / "files").exists()
        else []
    )
    assert after == before  # no file, no partial file
    assert all(f.filename != "requests.jsonl" for f in bob.files.list())


def test_a_file_whose_lines_do_not_match_the_batch_fails_validation_with_errors(keyed, tmp_path):
    server, keys = keyed
    bob = server.client(keys["bob"][1])
    completion = {"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny-llama", "prompt": "Hi"}}
    file_id = upload(bob, tmp_path / "mixed.jsonl", [chat_line("a", "Hi"), completion])
    batch = bob.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_for(bob, batch.id, lambda b: b.status == "failed", timeout=60)
    (error,) = failed.errors.data
    assert (error.code, error.line, error.param) == ("mismatched_endpoint", 2, "url")
    assert failed.output_file_id is None and failed.request_counts.completed == 0


def test_a_key_held_in_a_prefect_secret_block_opens_the_server(tmp_path):
    server = Server(tmp_path, "--api-key-secret", "batch-api-key")
    save = "from prefect.blocks.system import Secret; Secret(value='vbf-from-a-secret').save('batch-api-key')"
    saved = subprocess.run([sys.executable, "-c", save], cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=300)
    assert saved.returncode == 0, saved.stderr[-3000:]
    server.start()
    try:
        assert server.client("vbf-from-a-secret").batches.list().data == []
        with pytest.raises(openai.AuthenticationError):
            server.client("vbf-something-else").batches.list()
    finally:
        server.stop()


def test_an_open_server_refuses_to_listen_beyond_loopback(tmp_path):
    refused = subprocess.run(
        [VBF, "serve", "--host", "0.0.0.0", "--folder", str(tmp_path / "service")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "without API keys the server listens on 127.0.0.1 only" in refused.stderr


# ---------------------------------------------------------------- the dashboard page at /

PAYLOAD = '<script>document.title="owned"</script><img src=x onerror=alert(1)>'


def page(server: Server, **options) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{server.port}/", **options)


def test_the_dashboard_needs_a_key_shows_only_that_keys_batches_and_escapes_metadata(keyed, tmp_path):
    server, _ = keyed
    carol, dave = (re.search(r"key_\w+ \(\w+\): (\S+)", server.vbf("keys", "create", name))[1] for name in ("carol", "dave"))
    client = server.client(carol)
    file_id = upload(client, tmp_path / "carol.jsonl", [chat_line("c1", "Hi", model="not-served")])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"note": PAYLOAD}
    )
    wait_for(client, batch.id, lambda b: b.status == "failed", timeout=60)

    for refused in (page(server), page(server, params={"key": "vbf-wrong"})):  # no key, a wrong key: the form, no batch
        assert refused.status_code == 401 and '<input type="password" name="key"' in refused.text
        assert batch.id not in refused.text
    shown = page(server, params={"key": carol})
    assert shown.status_code == 200 and f'<tr class="batch" id="{batch.id}">' in shown.text
    assert "model_not_found" in shown.text and '<td class="state state-failed">failed</td>' in shown.text
    assert PAYLOAD not in shown.text and "&lt;script&gt;document.title=&quot;owned&quot;&lt;/script&gt;" in shown.text
    assert '<td class="loaded">idle</td>' in shown.text  # nothing runs

    # The form keeps the key in a cookie; dave's page has none of carol's batches.
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as browser:
        kept = browser.post("/", data={"key": dave}, follow_redirects=True)
        assert kept.status_code == 200 and "no batches yet" in kept.text and batch.id not in kept.text
        assert "httponly" in kept.history[0].headers["set-cookie"].lower()


# ---------------------------------------------------------------- batches that run (real vLLM runs)
# Two batches run at once (each its own `vbf run` process and engine): the slow tests pair them up.


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """An open server (no keys, loopback) serving two models: the tiny model, and the same weights with another seed."""
    folder = tmp_path_factory.mktemp("serve")
    models = [
        "--model",
        model_yaml(folder, "tiny-llama", tiny_model_dir, 0),
        "--model",
        model_yaml(folder, "tiny-seed7", tiny_model_dir, 7),
    ]
    server = Server(folder, *models, "--running-batches", "2").start()
    yield server
    server.stop()


FIRST_LINES = [chat_line(f"q{i}", f"Tell me about topic {i % 7}") for i in range(40)]
SECOND_LINES = [chat_line(f"s{i}", f"Tell me about topic {i}", model="tiny-seed7") for i in range(7)]


def run_processes(batch_id: str) -> list[psutil.Process]:
    """The batch's `vbf run` process (its command names the batch's folder)."""
    return [p for p in psutil.process_iter(["cmdline"]) if any(batch_id in part for part in p.info["cmdline"] or [])]


@pytest.fixture(scope="module")
def first_batches(server):
    """Two batches running at once, then the server SIGKILLed and started again:
    - the first (40 lines, 7 distinct requests, plus a line for an unknown model and one with an
      unsupported field, on tiny-llama) keeps running, and the new server watches it again;
    - the second (7 lines on tiny-seed7) has its run SIGKILLed with the server (its whole process
      group: engine too), and the new server starts it again."""
    client = server.client()
    lines = [*FIRST_LINES, chat_line("unknown-model", "Hi", model="gpt-9"), chat_line("with-tools", "Hi", tools=[])]
    first = client.batches.create(
        input_file_id=upload(client, server.folder / "first.jsonl", lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "first"},
    )
    assert first.status == "validating" and first.request_counts.total == 42
    second = client.batches.create(
        input_file_id=upload(client, server.folder / "second.jsonl", SECOND_LINES),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    for batch in (first, second):
        wait_for(client, batch.id, lambda b, batch=batch: run_processes(batch.id))  # its run has started
    time.sleep(3)
    server.kill()
    for process in run_processes(second.id):
        os.killpg(process.pid, signal.SIGKILL)
    server.start()
    return tuple(wait_for(client, batch.id, lambda b: b.status in ENDED) for batch in (first, second))


@pytest.mark.slow
def test_a_batch_completes_through_a_server_sigkill_with_one_line_per_input_line(server, first_batches):
    batch, _ = first_batches
    client = server.client()
    assert batch.status == "completed" and batch.model == "tiny-llama" and batch.metadata == {"job": "first"}
    assert batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    output, errors = ended_files(client, batch)
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in FIRST_LINES)
    assert {line["custom_id"]: line["error"]["code"] for line in errors} == {
        "unknown-model": "model_not_found",
        "with-tools": "invalid_request",
    }
    assert "tools" in next(line for line in errors if line["custom_id"] == "with-tools")["error"]["message"]

    # Each answer is the one in the results file, the duplicates answered from their canonical request.
    stored = dict(
        results(server, "SELECT custom_id, text FROM run_outputs JOIN runs USING (run_id) WHERE dataset_name = ?", batch.id)
    )
    for line in output:
        body = line["response"]["body"]
        assert body["model"] == "tiny-llama" and body["choices"][0]["message"]["content"] == stored[line["custom_id"]]
    assert results(server, "SELECT count(*) FROM runs WHERE dataset_name = ?", batch.id) == [(1,)]  # one run, watched again
    usage = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    assert batch.usage.output_tokens == usage > 0 and batch.usage.total_tokens == batch.usage.input_tokens + usage


@pytest.mark.slow
def test_a_batch_whose_run_died_with_the_server_is_run_again_on_its_own_model(server, first_batches):
    first, batch = first_batches
    client = server.client()
    assert batch.status == "completed" and batch.model == "tiny-seed7"
    output, errors = ended_files(client, batch)
    assert len(output) == 7 and not errors and {line["response"]["body"]["model"] for line in output} == {"tiny-seed7"}
    runs = results(
        server, "SELECT dataset_name, model_fingerprint, status FROM runs WHERE dataset_name IN (?, ?)", first.id, batch.id
    )
    assert len({fingerprint for _, fingerprint, _ in runs}) == 2  # another model: its own answers, never the first's
    assert "completed" in {status for name, _, status in runs if name == batch.id}
    # Nothing answered twice, across both batches and the killed run: one output per distinct request and model.
    assert results(server, "SELECT count(*), count(DISTINCT (request_key, model_fingerprint)) FROM outputs") == [(14, 14)]


@pytest.fixture(scope="module")
def stopped_batches(server, first_batches):
    """Two long batches at once, each starting with the 40 lines the first batch answered: one is
    cancelled once those count as completed, the other runs past its 150 s window (long enough for its run
    to start and count those 40 on a loaded machine: a run still starting at expiry has answered nothing)."""
    client = server.client()
    cancel_lines = [chat_line(f"long{i}", f"Write a long story number {i}", max_tokens=200) for i in range(3000)]
    # Far more work than the window holds: 3M tokens, over 3 minutes of the tiny model on this machine.
    expire_lines = [chat_line(f"slow{i}", f"Write a long poem number {i}", max_tokens=250) for i in range(12000)]
    to_cancel, to_expire = (
        client.batches.create(
            input_file_id=upload(client, server.folder / f"{name}.jsonl", [*FIRST_LINES, *lines]),
            endpoint="/v1/chat/completions",
            completion_window=window,
        )
        for name, lines, window in (("cancel", cancel_lines, "24h"), ("expire", expire_lines, "150s"))
    )
    assert to_expire.expires_at == to_expire.created_at + 150
    # The 40 lines answered by the first batch count as completed once the run has started.
    wait_for(client, to_cancel.id, lambda b: b.request_counts.completed >= 40)
    assert client.batches.cancel(to_cancel.id).status == "cancelling"
    return tuple(wait_for(client, batch.id, lambda b: b.status in ENDED, timeout=400) for batch in (to_cancel, to_expire))


@pytest.mark.slow
def test_a_cancelled_batch_keeps_what_finished_and_names_the_rest(server, stopped_batches):
    done, _ = stopped_batches
    client = server.client()
    assert done.status == "cancelled" and done.cancelling_at <= done.cancelled_at
    assert done.finalizing_at is None  # cancelling → cancelled, as OpenAI's: a poll never sees it finalizing
    output, errors = ended_files(client, done)
    answered = {line["custom_id"] for line in output}
    assert {line["custom_id"] for line in FIRST_LINES} <= answered and len(answered) < 3040
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert answered | {line["custom_id"] for line in errors} == {f"q{i}" for i in range(40)} | {f"long{i}" for i in range(3000)}
    assert len(output) + len(errors) == 3040
    assert results(server, "SELECT status FROM runs WHERE dataset_name = ?", done.id) == [
        ("cancelled",)
    ]  # stopped, not left running


@pytest.mark.slow
def test_a_batch_past_its_window_expires_with_the_unanswered_lines_as_batch_expired(server, stopped_batches):
    _, done = stopped_batches
    client = server.client()
    assert done.status == "expired" and done.expired_at >= done.expires_at and done.finalizing_at is None
    output, errors = ended_files(client, done)
    assert {line["custom_id"] for line in FIRST_LINES} <= {line["custom_id"] for line in output}
    assert errors and {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert len(output) + len(errors) == 12040
    assert results(server, "SELECT status FROM runs WHERE dataset_name = ?", done.id) == [("cancelled",)]


# ---------------------------------------------------------------- the dashboard in a real browser


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def run_metrics(port: int, timeout: float = 120) -> str:
    """The batch's run's Prometheus metrics, once they count its requests (its flow serves them after it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if "vbf_run_requests{" in text:
                return text
        assert time.monotonic() < deadline, f"no run metrics on port {port} after {timeout:.0f} s"
        time.sleep(0.5)


def live_progress_of(batch_folder: Path, answered: int, timeout: float = 180) -> dict:
    """The batch's run's progress file, once it counts `answered` requests finished."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            live = json.loads((batch_folder / "progress.json").read_text())
            if live["finished"] >= answered:
                return live
        assert time.monotonic() < deadline, f"no progress file counting {answered} in {batch_folder} after {timeout:.0f} s"
        time.sleep(0.3)


def page_cell(dom: str, batch_id: str, name: str) -> str:
    row = re.search(rf'<tr class="batch" id="{batch_id}">(.*?)</tr>', dom, re.S)
    assert row, f"no row for {batch_id} in the page"
    return re.search(rf'<td class="[^"]*\b{name}\b[^"]*">(.*?)</td>', row[1], re.S)[1]


@pytest.mark.slow
def test_the_dashboard_in_headless_chromium_shows_a_running_batch_as_the_api_does(tmp_path, tiny_model_dir):
    """...and the batch's run serves its Prometheus metrics on the server's --metrics-port."""
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (`make system-packages` installs it)")
    metrics_port = free_port()
    model = model_yaml(tmp_path, "tiny-llama", tiny_model_dir, 0)
    server = Server(tmp_path, "--model", model, "--metrics-port", str(metrics_port)).start()
    client, url, screenshot = server.client(), f"http://127.0.0.1:{server.port}/", tmp_path / "dashboard.png"
    try:
        lines = [chat_line(f"p{i}", f"Write a page about subject {i}", max_tokens=64) for i in range(2000)]
        batch = client.batches.create(
            input_file_id=upload(client, tmp_path / "dashboard.jsonl", lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"note": PAYLOAD},
        )
        try:
            # Its run has started: far from done (its first shard alone is 1,024 lines of 64 tokens).
            before = wait_for(client, batch.id, lambda b: b.status == "in_progress" and run_processes(batch.id), timeout=60)
            metrics = run_metrics(metrics_port)
            # The run is answering: its progress file (rewritten every second) counts requests the engine finished.
            live_before = live_progress_of(tmp_path / "service" / "batches" / batch.id, answered=1)
            dom = chromium("--dump-dom", url, profile=tmp_path / "chromium").stdout
            after = client.batches.retrieve(batch.id)
            live_after = live_progress_of(tmp_path / "service" / "batches" / batch.id, answered=1)
            chromium(f"--screenshot={screenshot}", "--window-size=1280,900", url, profile=tmp_path / "chromium")
        finally:  # the test ends fast, and the run stops before the server does (it would outlive it)
            with contextlib.suppress(openai.ConflictError):
                client.batches.cancel(batch.id)
            ended = wait_for(client, batch.id, lambda b: b.status in ENDED, timeout=120)
    finally:
        server.stop()

    assert page_cell(dom, batch.id, "state") == "in_progress" and page_cell(dom, batch.id, "model") == "tiny-llama"
    shown = {name: int(page_cell(dom, batch.id, name)) for name in ("completed", "failed", "total")}
    assert before.request_counts.completed <= shown["completed"] <= after.request_counts.completed
    assert shown["total"] == after.request_counts.total == 2000 and shown["failed"] == after.request_counts.failed
    assert re.search(r'<td>tiny-llama</td><td class="loaded">loaded</td>', dom)
    # Progress, throughput and ETA are the run's live ones, between commits: what the file said around the page's read.
    percent = float(re.search(r"([\d.]+)%", page_cell(dom, batch.id, "progress"))[1])
    low, high = (100 * live["finished"] / live["total"] for live in (live_before, live_after))
    assert low - 0.05 <= percent <= high + 0.05, (percent, low, high)
    assert "requests/s" in page_cell(dom, batch.id, "throughput") and "tokens/s" in page_cell(dom, batch.id, "throughput")
    # The browser ran the page: the payload in metadata is text in its cell, never a script or an image.
    assert "<script" not in dom and "<img" not in dom
    assert "&lt;script&gt;" in page_cell(dom, batch.id, "metadata")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    # The run on the page is the run Prometheus would scrape: the batch id is its dataset, its 2,000 lines its requests.
    assert re.search(rf'vbf_run_info\{{[^}}]*dataset="{batch.id}"', metrics), metrics
    assert re.search(r"vbf_run_requests\{[^}]*\} 2000\.0", metrics), metrics
    assert ended.status == "cancelled"
