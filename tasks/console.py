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
        return record.levelno >= logging.WARNING and record.name.startswith("prefect")


_file_handler: logging.Handler | None = None
LIBRARIES = ("vllm", "great_expectations")  # they log through handlers of their own, not the root's


def quiet(log_path: str) -> None:
    """Send third-party output to `log_path` from now on (this process and the engine processes it starts)."""
    global _log_path, _file_handler
    _log_path = log_path
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    _file_handler = logging.FileHandler(log_path)
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(_file_handler)
    logging.captureWarnings(True)  # warnings.warn(...) become log records: into the file, off the terminal
    filter_terminal()
    route_library_logs()


def filter_terminal() -> None:
    """Keep only our own lines on the terminal's handlers (again after Prefect sets up its logging), when quiet."""
    if _file_handler is None:
        return
    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        if handler is not _file_handler and not any(isinstance(f, KeepOwnLines) for f in handler.filters):
            handler.addFilter(KeepOwnLines())


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
def output_to_log() -> Iterator[None]:
    """This process's stdout and stderr into the log file for a moment (an import that prints), when quiet."""
    if _log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    originals = {fd: os.dup(fd) for fd in (1, 2)}
    with open(_log_path, "ab") as log:
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
