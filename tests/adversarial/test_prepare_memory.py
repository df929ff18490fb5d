"""A JSONL line of hundreds of megabytes is a rejected row, read without ever being held whole:
the real pipeline in a process whose address space is capped well below the line's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINE_BYTES = 300 << 20
HEADROOM = 150 << 20  # the cap: what the process uses after a warm-up run, plus this (half the line)

# Prepares a small file first (imports, compiled loops, GX loaded), then caps the address space at
# what is mapped by then plus HEADROOM, and prepares the file with the huge line.
SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from tasks import storage
    from tasks.config import DatasetSpec
    from tasks.prepare.requests import prepare_requests

    def run(source, folder):
        spec = DatasetSpec(name="t", source=source, id_column="id", prompt_column="prompt")
        request_set = prepare_requests(spec, "chat", folder, None)
        rejected = [r for f in request_set.rejected_files for r in storage.read_parquet(f).to_pylist()]
        return request_set, rejected

    small, big, folder, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    run(small, folder + "/warm-up")
    mapped = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, mapped + headroom))
    request_set, rejected = run(big, folder + "/big")
    print(json.dumps({"requests": request_set.requests, "rejected": rejected, "limit": mapped + headroom}))
    """
)


def write_lines(path: Path, huge_line_bytes: int) -> None:
    with path.open("wb") as out:
        out.write(json.dumps({"id": "a", "prompt": "one"}).encode() + b"\n")
        out.write(b'{"id": "huge", "prompt": "')
        block = b"x" * (1 << 20)
        for _ in range(huge_line_bytes >> 20):
            out.write(block)
        out.write(b'"}\n')
        out.write(json.dumps({"id": "c", "prompt": "three"}).encode() + b"\n")


def test_a_huge_jsonl_line_is_rejected_under_an_address_space_cap(tmp_path):
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    write_lines(small, 1 << 20)
    write_lines(big, LINE_BYTES)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(small), str(big), str(tmp_path / "storage"), str(HEADROOM)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["requests"] == 2
    assert [(r["source_file"], r["source_row"], r["field"]) for r in result["rejected"]] == [(str(big), 1, "line")]
    assert result["rejected"][0]["reason"] == f"line 2: longer than max_line_bytes ({16 << 20} bytes)"
