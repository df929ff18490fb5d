"""The reaper: started by a process that runs vLLM or a batch command (`faults.ensure_reaper`), it notes
that process's vLLM engine processes and Prefect's temporary server as they come, and when the process
ends — even by SIGKILL, which runs none of its clean-up — kills them, so no engine keeps its memory
(a GPU's) and no server its port after the run that started them.

It learns of the end from its stdin: a pipe whose only write end the parent holds, so it reads EOF
the moment the parent is gone. Run as a script with `python -I`: standard library and psutil only.
"""

import os
import select
import signal
import sys
from contextlib import suppress

import psutil

# vLLM names its processes VLLM::EngineCore, VLLM::Worker, ... (spawned as multiprocessing.spawn before
# it renames them); Prefect's temporary server is uvicorn on this app factory, one per process that uses it.
REAPED = ("VLLM::", "multiprocessing.spawn", "prefect.server.api.server:create_app")


def processes_to_reap(parent: psutil.Process) -> list[psutil.Process]:
    """The parent's descendants that must not outlive it."""
    found = []
    for child in parent.children(recursive=True):
        with suppress(psutil.Error):
            command = " ".join(child.cmdline())
            if any(mark in command for mark in REAPED):
                found.append(child)
    return found


def main() -> None:
    # A Ctrl-C or SIGTERM to the process group is the parent's to handle; the reaper's end is the parent's end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = psutil.Process(os.getppid())
    seen: dict[int, psutil.Process] = {}
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.5)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the parent is gone
        try:
            seen.update((process.pid, process) for process in processes_to_reap(parent))
        except psutil.NoSuchProcess:
            break
    for process in seen.values():
        with suppress(psutil.Error):
            if process.is_running():  # compares the start time too: never a reused pid
                process.kill()


if __name__ == "__main__":
    main()
