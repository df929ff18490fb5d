"""A local Label Studio server in its own virtualenv (its pins conflict with Prefect's).

    python scripts/label_studio_server.py install          # creates .cache/label-studio-venv once
    python scripts/label_studio_server.py serve --port 8080 # headless on 127.0.0.1, until Ctrl-C

The tests import this file to start a throwaway server with a preset user and API token.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSION = "1.23.2"
VENV = REPO / ".cache" / "label-studio-venv"
EXECUTABLE = VENV / "bin" / "label-studio"


def ensure_installed(venv: Path = VENV) -> Path:
    """Create the virtualenv and install the server, unless this version is already there. Under a lock:
    test processes running side by side (pytest -n) may both want it."""
    marker = venv / f".installed-label-studio-{VERSION}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "label-studio-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        install_unless_marked(venv, marker)
    return venv / "bin" / "label-studio"


def install_unless_marked(venv: Path, marker: Path) -> None:
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        log = venv / "install.log"
        with log.open("w") as out:
            done = subprocess.run(
                [venv / "bin" / "pip", "install", "--progress-bar", "off", f"label-studio=={VERSION}"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if done.returncode != 0:
            raise RuntimeError(f"installing label-studio=={VERSION} into {venv} failed; see {log}")
        marker.touch()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(data_dir: Path, username: str, password: str, token: str) -> dict[str, str]:
    return {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": username,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        # the preset token is a legacy token: it only works if enabled at the first start
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    }


def start(data_dir: Path, port: int, username: str, password: str, token: str) -> subprocess.Popen:
    """Start headless in its own process group, so `stop` can end it with all its children."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "server.log").open("ab")
    command = [
        str(ensure_installed()),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--username",
        username,
        "--password",
        password,
        "--user-token",
        token,
        "--enable-legacy-api-token",
    ]
    return subprocess.Popen(
        command,
        env=server_env(data_dir, username, password, token),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_until_ready(process: subprocess.Popen, url: str, timeout_seconds: float = 180) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Label Studio exited with code {process.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"Label Studio did not answer at {url} within {timeout_seconds:.0f}s")


def stop(process: subprocess.Popen) -> None:
    """End the whole process group: terminate, then kill what is left after 15 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "serve"])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--data-dir", default=str(REPO / ".cache" / "label-studio-data"))
    parser.add_argument("--username", default="reviewer@example.com")
    parser.add_argument("--password", default="change-me-please")
    parser.add_argument("--token", default="local-dev-token-0123456789", help="legacy API token to preset")
    args = parser.parse_args()
    executable = ensure_installed()
    if args.command == "install":
        print(executable)
        return
    process = start(Path(args.data_dir), args.port, args.username, args.password, args.token)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_until_ready(process, url)
        print(f"Label Studio at {url} — user {args.username}, API token {args.token}. Ctrl-C stops it.")
        process.wait()
    finally:
        stop(process)


if __name__ == "__main__":
    main()
