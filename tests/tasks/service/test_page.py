"""The dashboard page's numbers and HTML, from batch objects of OpenAI's shape (no server)."""

from __future__ import annotations

from html.parser import HTMLParser

from tasks.service.objects import batch_object, moved
from tasks.service.page import (
    REFRESH_SECONDS,
    clock,
    dashboard,
    duration,
    eta_seconds,
    key_form,
    progress_percent,
    throughput,
)

T0 = 1_700_000_000


def running(completed: int, failed: int = 0, total: int = 1000, started: int = T0, **fields) -> dict:
    batch = batch_object("file-1", "/v1/chat/completions", "24h", fields.pop("metadata", None), total)
    batch = {**batch, "created_at": started - 5, "status": "in_progress", "in_progress_at": started, "model": "tiny-llama"}
    return {**batch, "request_counts": {"total": total, "completed": completed, "failed": failed}, **fields}


def test_progress_counts_answered_and_failed_lines_and_an_empty_batch_has_none():
    assert progress_percent(running(240, 10)) == 25.0
    assert progress_percent(running(0, total=0)) is None


def test_throughput_is_lines_per_second_since_in_progress_and_stops_with_the_batch():
    assert throughput(running(300, 100), at=T0 + 40) == 10.0
    assert throughput(running(300), at=T0 + 0.5) is None  # under a second: no rate yet
    assert throughput({**running(300), "in_progress_at": None, "status": "validating"}, at=T0 + 40) is None
    ended = {**running(1000), "status": "completed", "finalizing_at": T0 + 50, "completed_at": T0 + 52}
    assert throughput(ended, at=T0 + 5000) == 20.0  # the time after it stopped does not dilute the rate


def test_eta_is_what_is_left_at_the_rate_so_far_and_unknown_without_progress():
    assert eta_seconds(running(250), at=T0 + 50) == 150.0  # 5 lines/s, 750 left
    assert eta_seconds(running(0), at=T0 + 50) is None  # no rate: unknown, not a division by zero
    assert eta_seconds(running(0), at=T0) is None
    assert eta_seconds({**running(1000), "status": "completed", "completed_at": T0 + 9}, at=T0 + 50) is None
    assert duration(None) == "unknown"
    assert (duration(42), duration(185), duration(3720)) == ("42s", "3m 05s", "1h 02m")
    assert clock(T0) == "2023-11-14 22:13:20" and clock(None) == "—"


class Cells(HTMLParser):
    """The text of each element with a class, by class; script elements and the attributes of all."""

    def __init__(self, html: str):
        super().__init__()
        self.stack: list[str] = []
        self.text: dict[str, str] = {}
        self.scripts = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        if tag not in ("br", "meta", "input"):
            self.stack.append(dict(attrs).get("class") or "")

    def handle_endtag(self, tag):
        if tag not in ("br", "meta", "input"):
            self.stack.pop()

    def handle_data(self, data):
        for name in {c for entry in self.stack for c in entry.split()}:
            self.text[name] = self.text.get(name, "") + data


def test_the_page_shows_a_running_batch_its_numbers_and_which_model_is_loaded():
    batch = running(250, 5, metadata={"job": "nightly"})
    failed = moved(running(0, total=3), "failed", model=None)
    failed["errors"] = {
        "object": "list",
        "data": [{"code": "mismatched_endpoint", "message": "line 2 uses /v1/completions", "line": 2}],
    }
    html = dashboard([batch, failed], {"tiny-llama": True, "tiny-seed7": False}, "local", at=T0 + 51)
    assert f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' in html
    rows = html.split('<tr class="batch"')[1:]
    assert len(rows) == 2 and batch["id"] in rows[0] and failed["id"] in rows[1]
    first = Cells(rows[0].split("</tr>")[0])
    assert first.text["state"] == "in_progress" and first.text["model"] == "tiny-llama"
    assert (first.text["completed"], first.text["failed"], first.text["total"]) == ("250", "5", "1000")
    assert first.text["progress"].strip() == "25.5%" and first.text["throughput"] == "5.0 lines/s"
    assert first.text["eta"] == "2m 29s"  # 745 left at 5 lines/s
    assert "5 failed" in first.text["errors"] and first.text["metadata"] == "job=nightly"
    assert first.text["created"] == clock(T0 - 5)
    second = Cells(rows[1].split("</tr>")[0])
    assert second.text["state"] == "failed" and second.text["eta"] == "—"
    assert "mismatched_endpoint (line 2): line 2 uses /v1/completions" in second.text["errors"]
    assert '<tr class="served-model" id="model-tiny-llama"><td>tiny-llama</td><td class="loaded">loaded</td>' in html
    assert '<td>tiny-seed7</td><td class="loaded">idle</td>' in html


def test_a_running_batch_with_live_progress_shows_it_and_keeps_its_committed_counts():
    """Commits come a shard at a time; the run's progress file moves every second: the page's progress,
    throughput and ETA follow it, its counts stay what the output file would hold."""
    batch, ended = running(250, 5), moved(running(1000), "completed", completed_at=T0 + 40)
    live = {"finished": 612, "total": 1000, "requests_per_second": 12.4, "tokens_per_second": 1800.2, "eta_seconds": 31.0}
    html = dashboard([batch, ended], {}, "local", at=T0 + 51, live={batch["id"]: live, ended["id"]: live})
    first, second = (Cells(row.split("</tr>")[0]) for row in html.split('<tr class="batch"')[1:])
    assert (first.text["completed"], first.text["failed"]) == ("250", "5")  # committed lines
    assert first.text["progress"].strip() == "61.2%"
    assert first.text["throughput"] == "12 requests/s · 1,800 tokens/s" and first.text["eta"] == "31s"
    # an ended batch shows its own numbers, whatever a progress file says
    assert second.text["progress"].strip() == "100.0%" and second.text["eta"] == "—"
    # no live progress yet (a run still starting, or a deployment's): the committed counts' numbers
    html = dashboard([batch], {}, "local", at=T0 + 51, live={batch["id"]: None})
    plain = Cells(html.split('<tr class="batch"')[1].split("</tr>")[0])
    assert plain.text["progress"].strip() == "25.5%" and plain.text["throughput"] == "5.0 lines/s"


def test_text_a_user_chose_is_escaped_never_markup():
    payload = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    batch = running(1, metadata={"note": payload, '"><b>key</b>': "v"})
    batch["errors"] = {"object": "list", "data": [{"code": "bad", "message": payload, "line": None}]}
    html = dashboard([batch], {"tiny-llama": False}, "<i>owner</i>", at=T0 + 10)
    parsed = Cells(html)
    assert parsed.scripts == 0 and "<img" not in html and "<b>key" not in html and "<i>owner" not in html
    assert payload in parsed.text["metadata"] and payload in parsed.text["errors"]  # shown as text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "<script>" not in key_form(payload)


def test_no_batches_says_so():
    assert "no batches yet" in dashboard([], {"tiny-llama": False}, "local", at=T0)
