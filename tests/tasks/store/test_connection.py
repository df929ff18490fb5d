"""Opening the results file while another process holds it: writers and readers wait, then say what holds it."""

import subprocess
import sys
import textwrap
import time

import pytest

from tasks.store.connection import open_for_read, open_for_write
from tasks.store.queries import answered_before
from tasks.store.sql import StoreError

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def hold_lock(path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


@pytest.mark.parametrize("purpose, opener", [("writing", open_for_write), ("reading", open_for_read)])
def test_opening_waits_for_another_process_then_says_what_holds_the_file(tmp_path, purpose, opener):
    path = tmp_path / "r.duckdb"
    open_for_write(path).close()
    holder = hold_lock(path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"{path.name} could not be opened for {purpose} within 1s.*(lock|PID)"):
            opener(path, lock_timeout_seconds=1)
        assert time.monotonic() - started >= 1
        assert answered_before(str(path), "input", "fp", "sh") is False  # the CLI's peek never waits
    finally:
        holder.kill()
        holder.wait()

    holder = hold_lock(path, 1.5)
    try:
        opener(path, lock_timeout_seconds=30).close()  # waits until the holder lets go
    finally:
        holder.wait()


def test_a_reader_says_when_there_is_no_results_file_yet(tmp_path):
    with pytest.raises(StoreError, match="missing.duckdb does not exist: run `vbf run` first"):
        open_for_read(tmp_path / "missing.duckdb")
    assert not (tmp_path / "missing.duckdb").exists()  # reading never creates the file
