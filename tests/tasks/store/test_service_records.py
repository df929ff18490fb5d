"""The Batch API's records in a real SQLite file: the queue's order (priority, then age), a cancel that
a runner's later write cannot undo, and keys found by hash only while not revoked."""

from __future__ import annotations

from tasks.service.objects import batch_object
from tasks.store.service import (
    add_batch,
    add_key,
    any_active_key,
    batches_in,
    key_of_hash,
    request_cancel,
    revoke_key,
    service_db,
    update_batch,
)


def new_batch(con, priority: str) -> dict:
    batch = batch_object("file-x", "/v1/chat/completions", "24h", {"priority": priority}, total=1)
    add_batch(con, "owner", batch, {"high": 0, "normal": 1, "low": 2}[priority], run={"attempts": 0})
    return batch


def test_the_queue_runs_high_priority_first_then_oldest_first(tmp_path):
    with service_db(tmp_path / "service.sqlite") as con:
        low, high, normal, high_later = (new_batch(con, p)["id"] for p in ("low", "high", "normal", "high"))
    with service_db(tmp_path / "service.sqlite") as con:
        assert [batch["id"] for batch, _ in batches_in(con, ("validating",))] == [high, high_later, normal, low]


def test_a_cancel_survives_the_runners_later_write_of_the_same_batch(tmp_path):
    path = tmp_path / "service.sqlite"
    with service_db(path) as con:
        batch = new_batch(con, "normal")
    runner_view = {**batch, "status": "in_progress", "in_progress_at": 1}  # read by the runner before the cancel
    with service_db(path) as con:
        assert request_cancel(con, batch["id"], "owner", at=5)["status"] == "cancelling"
        assert request_cancel(con, batch["id"], "someone else", at=5) is None
    with service_db(path) as con:
        stored = update_batch(con, batch["id"], runner_view)
    assert (stored["status"], stored["cancelling_at"], stored["in_progress_at"]) == ("cancelling", 5, 1)
    with service_db(path) as con:
        assert [b["status"] for b, _ in batches_in(con, ("cancelling",))] == ["cancelling"]


def test_keys_are_found_by_hash_until_revoked(tmp_path):
    with service_db(tmp_path / "service.sqlite") as con:
        assert not any_active_key(con)
        add_key(con, "key_1", "alice", "hash-1")
        assert any_active_key(con) and key_of_hash(con, "hash-1") == "key_1" and key_of_hash(con, "hash-2") is None
        assert revoke_key(con, "key_1") and not revoke_key(con, "key_1")
        assert key_of_hash(con, "hash-1") is None and not any_active_key(con)
