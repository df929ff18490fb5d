"""Inputs that change are seen to change: a source edited behind an HTTP server, and the prepare
code itself. The prepared-input cache must not hand back the old requests."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks import storage
from tasks.config import DatasetSpec
from tasks.prepare.requests import prepare_requests

REPO = Path(__file__).resolve().parents[2]


class WithETag(SimpleHTTPRequestHandler):
    """Python's file server (Last-Modified, in whole seconds) plus an ETag: the content's hash."""

    def end_headers(self):
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_header("ETag", '"' + hashlib.sha256(path.read_bytes()).hexdigest() + '"')
        super().end_headers()

    def log_message(self, *args):
        pass


class LastModifiedOnly(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(params=[WithETag, LastModifiedOnly], ids=["etag", "last-modified-only"])
def served(request, tmp_path):
    """A real HTTP server in a thread, serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(request.param, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def prompts(spec: DatasetSpec, storage_root: str) -> list[str]:
    request_set = prepare_requests(spec, "chat", storage_root, None)
    return [row["prompt"] for f in request_set.request_files for row in storage.read_parquet(f).to_pylist()]


def test_an_edited_http_source_is_read_again(served, tmp_path):
    root, url = served
    lines = [{"id": "a", "prompt": "first version"}, {"id": "b", "prompt": "unchanged"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    mtime = (root / "prompts.jsonl").stat().st_mtime
    spec = DatasetSpec(name="t", source=f"{url}/prompts.jsonl", id_column="id", prompt_column="prompt")
    storage_root = str(tmp_path / "storage")
    assert prompts(spec, storage_root) == ["first version", "unchanged"]

    # Same size, same second: neither Content-Length nor Last-Modified shows the edit.
    lines[0]["prompt"] = "second version"
    (root / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.utime(root / "prompts.jsonl", (mtime, mtime))
    assert prompts(spec, storage_root) == ["second version", "unchanged"]


# Prepares the dataset with the `tasks` package found on PYTHONPATH and prints the rejected reasons.
PREPARE = textwrap.dedent(
    """
    import json, sys
    from tasks import storage
    from tasks.config import DatasetSpec
    from tasks.prepare.requests import prepare_requests

    spec = DatasetSpec(name="t", source=sys.argv[1], id_column="id", prompt_column="prompt")
    request_set = prepare_requests(spec, "chat", sys.argv[2], None)
    print(json.dumps([r["reason"] for f in request_set.rejected_files for r in storage.read_parquet(f).to_pylist()]))
    """
)


def test_a_change_to_the_prepare_code_prepares_the_input_again(tmp_path):
    """A copy of the code, run, then fixed (a rejection's wording), run again on the same storage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    code = tmp_path / "code"
    shutil.copytree(REPO / "tasks", code / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["hello", "   "]}), source)

    def run() -> list[str]:
        env = {**os.environ, "PYTHONPATH": str(code)}
        done = subprocess.run(
            [sys.executable, "-c", PREPARE, str(source), str(tmp_path / "storage")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,  # not the repository: `python -c` puts the working folder first on the path
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert run() == ["prompt is empty"]
    render = code / "tasks" / "prepare" / "render.py"
    assert '"prompt is empty"' in render.read_text()
    render.write_text(render.read_text().replace('"prompt is empty"', '"prompt is blank"'))
    assert run() == ["prompt is blank"]
