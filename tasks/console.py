"""A quiet console: what a run says about itself on the terminal, everything else in a log file.

vLLM's engine processes, its INFO lines, Triton, NUMA and `FutureWarning` notices, Great
Expectations and each task run's "Finished" line go to the log file (under the storage folder);
the terminal keeps the flow's own lines, warnings and errors from this project and Prefect, the
progress and the summary. `--verbose` shows everything, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

# Loggers whose lines the terminal keeps at every level: the flow run's own, and ours.
OWN = ("prefect.flow_runs", "tasks", "flows", "vbf")
# Prefect's background services: an event the UI will miss is no news on the terminal (a temporary
# server's first start, building its database, drops some; the run is not affected).
BACKGROUND = ("prefect.events", "prefect._internal")

_log_path: str | None = None  # set by quiet(): third-party output goes there instead of the terminal


def log_file_for(storage: str, duckdb_path: str) -> str:
    """Under the storage folder, or beside the results file when storage is a URL."""
    folder = Path(storage if "://" not in storage else Path(duckdb_path).parent) / "logs"
    return str(folder / f"vbf-{datetime.now():%Y%m%dT%H%M%S}-{os.getpid()}.log")


class KeepOwnLines(logging.Filter):
    """On the terminal: our own and the flow run's lines, and anyone's warnings and errors but
    third parties' (those are in the log file with everything else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(OWN):
            return True
        if record.name.startswith(BACKGROUND):
            return False
        return record.levelno >= logging.WARNING and record.name.startswith("prefect")


_file_handler: logging.Handler | None = None
LIBRARIES = ("vllm", "great_expectations", "py.warnings")  # handlers of their own, or warnings before Prefect's


def quiet(log_path: str) -> None:
    """Send third-party output to `log_path` from now on (this process and the engine processes it starts)."""
    global _log_path, _file_handler
    _log_path = log_path
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    _file_handler = logging.FileHandler(log_path)
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)  # warnings.warn(...) become records of `py.warnings`: into the file, off the terminal
    route_library_logs()


def filter_terminal() -> None:
    """Once Prefect has set up its logging (it leaves a root logger that has handlers alone): every
    record into the log file too, and only our own lines on the terminal's handlers. When quiet."""
    if _file_handler is None:
        return
    root = logging.getLogger()
    for handler in root.handlers + logging.getLogger("prefect").handlers:
        if not any(isinstance(f, KeepOwnLines) for f in handler.filters):
            handler.addFilter(KeepOwnLines())
            to_terminal(handler)
    if _file_handler not in root.handlers:
        root.addHandler(_file_handler)


def to_terminal(handler: logging.Handler) -> None:
    """A console handler writes to the terminal itself, not to fd 2: while the engine starts, fds 1
    and 2 are a pipe (EngineOutput) whose lines a quiet console sends to the log file."""
    if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
        terminal = open(os.dup(handler.stream.fileno()), "w", buffering=1)  # noqa: SIM115 - lives as long as the handler
        handler.setStream(terminal)
        if hasattr(handler, "console"):  # Prefect's handler prints through a rich Console
            handler.console.file = terminal


def route_library_logs() -> None:
    """The libraries' own handlers (vLLM adds one when imported) replaced by the log file, when quiet."""
    if _file_handler is None:
        return
    for name in LIBRARIES:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.addHandler(_file_handler)
        library.propagate = False


def log_path() -> str | None:
    return _log_path


@contextlib.contextmanager
def output_to_log(or_nowhere: bool = False) -> Iterator[None]:
    """This process's stdout and stderr into the log file for a moment (an import that prints), when quiet;
    `or_nowhere`: when not quiet, into /dev/null (a notice that would stand before a command's own line)."""
    if _log_path is None and not or_nowhere:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    originals = {fd: os.dup(fd) for fd in (1, 2)}
    with open(_log_path or os.devnull, "ab") as log:
        for fd in originals:
            os.dup2(log.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in originals.items():
            os.dup2(original, fd)
            os.close(original)
