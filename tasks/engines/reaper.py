"""The reaper: started by a process that runs vLLM (`faults.ensure_reaper`), it notes that process's
vLLM engine processes as they come, and when the process ends — even by SIGKILL, which runs none of
its clean-up — kills them, so no engine keeps its memory (a GPU's) after the run that started it.

It learns of the end from its stdin: a pipe whose only write end the parent holds, so it reads EOF
the moment the parent is gone. Run as a script with `python -I`: standard library and psutil only.
"""

import os
import select
import signal
import sys
from contextlib import suppress

import psutil


def engine_processes(parent: psutil.Process) -> list[psutil.Process]:
    """The parent's descendants that vLLM spawned (it names them VLLM::EngineCore, VLLM::Worker, ...)."""
    found = []
    for child in parent.children(recursive=True):
        with suppress(psutil.Error):
            command = " ".join(child.cmdline())
            if "VLLM::" in command or "multiprocessing.spawn" in command:  # the latter before vLLM renames it
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
            seen.update((process.pid, process) for process in engine_processes(parent))
        except psutil.NoSuchProcess:
            break
    for process in seen.values():
        with suppress(psutil.Error):
            if process.is_running():  # compares the start time too: never a reused pid
                process.kill()


if __name__ == "__main__":
    main()
