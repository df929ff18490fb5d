"""The dashboard page of `vbf serve` at `/`: batches and models as server-rendered HTML (pure, no I/O).

The route (app.py) reads the caller's batch objects and the served models; everything here is a
function of those and the time. Every piece of text a user could have chosen — metadata, error
messages, ids — is escaped, so a `<script>` in metadata shows as text and never runs.
"""

from __future__ import annotations

import time
from html import escape

REFRESH_SECONDS = 3  # the page reloads itself: a plain <meta refresh>, no JavaScript
ENDINGS = ("completed", "failed", "expired", "cancelled")


# ---------------------------------------------------------------- numbers


def lines_done(batch: dict) -> int:
    counts = batch["request_counts"]
    return counts["completed"] + counts["failed"]


def progress_percent(batch: dict) -> float | None:
    """Lines answered or failed, as a share of all lines; None for an empty batch."""
    total = batch["request_counts"]["total"]
    return 100.0 * lines_done(batch) / total if total else None


def running_until(batch: dict, at: float) -> float:
    """The end of the batch's running time: now while it runs, the moment it stopped once it has."""
    stopped = [batch.get(f"{state}_at") for state in ("finalizing", "cancelling", *ENDINGS)]
    stopped = [moment for moment in stopped if moment]
    return min(stopped) if stopped else at


def throughput(batch: dict, at: float) -> float | None:
    """Lines per second since the batch went in progress; None before it did, or within its first second."""
    started = batch.get("in_progress_at")
    if not started:
        return None
    seconds = running_until(batch, at) - started
    return lines_done(batch) / seconds if seconds >= 1 else None


def eta_seconds(batch: dict, at: float) -> float | None:
    """Seconds left at the rate so far; None when it is not running or nothing is done yet (no rate to go by)."""
    if batch["status"] != "in_progress":
        return None
    rate = throughput(batch, at)
    if not rate:
        return None
    return (batch["request_counts"]["total"] - lines_done(batch)) / rate


def live_cells(progress: dict) -> tuple[float | None, str, float | None]:
    """From a running batch's live progress (its run's requests, duplicates once): percent, throughput, ETA."""
    percent = 100.0 * progress["finished"] / progress["total"] if progress["total"] else None
    rates = [
        f"{progress[name]:,.0f} {unit}/s"
        for name, unit in (("requests_per_second", "requests"), ("tokens_per_second", "tokens"))
        if progress.get(name) is not None
    ]
    return percent, " · ".join(rates) or "—", progress.get("eta_seconds")


def duration(seconds: float | None) -> str:
    """`1h 02m`, `3m 05s`, `42s`; `unknown` for None."""
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def clock(timestamp: float | None) -> str:
    """A Unix time in UTC as `2025-01-31 14:05:09`; `—` for none."""
    if not timestamp:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def rate_text(rate: float | None) -> str:
    return "—" if rate is None else f"{rate:.1f} lines/s"


def percent_text(percent: float | None) -> str:
    return "—" if percent is None else f"{percent:.1f}%"


# ---------------------------------------------------------------- HTML


STYLE = """
body { font-family: system-ui, sans-serif; font-size: 13px; margin: 1rem; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.45rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { width: 4rem; height: 0.6rem; background: #eee; display: inline-block; }
.bar span { display: block; height: 100%; background: #3a7; }
.state-in_progress { color: #06c; } .state-completed { color: #282; } .state-failed, .state-expired { color: #b22; }
.error { color: #b22; font-size: 0.9em; }
td.model, td.created, td.eta, td.throughput, td.progress { white-space: nowrap; }
td.errors, td.metadata { max-width: 14rem; overflow-wrap: anywhere; }
.muted { color: #777; }
"""


def text(value: object) -> str:
    """Any value as escaped HTML text (quotes too: it may land in an attribute)."""
    return escape("" if value is None else str(value), quote=True)


def errors_cell(batch: dict) -> str:
    failed = batch["request_counts"]["failed"]
    parts = [f"{failed} failed"] if failed else []
    for error in (batch.get("errors") or {}).get("data") or []:
        where = f" (line {error['line']})" if error.get("line") else ""
        parts.append(f'<div class="error">{text(error.get("code"))}{text(where)}: {text(error.get("message"))}</div>')
    return "".join(parts) or '<span class="muted">none</span>'


def metadata_cell(batch: dict) -> str:
    pairs = (batch.get("metadata") or {}).items()
    return "<br>".join(f"{text(key)}={text(value)}" for key, value in pairs) or '<span class="muted">—</span>'


def batch_row(batch: dict, at: float, live: dict | None = None) -> str:
    """One batch. Its counts are the committed ones (what its output file would hold); while it runs,
    progress, throughput and ETA come from its run's live progress when there is one (it moves every
    second, where commits come a shard at a time)."""
    counts, percent = batch["request_counts"], progress_percent(batch)
    rate, eta = rate_text(throughput(batch, at)), eta_seconds(batch, at)
    running = batch["status"] == "in_progress"
    if running and live:
        percent, rate, eta = live_cells(live)
    bar = f'<span class="bar"><span style="width:{percent or 0:.1f}%"></span></span> ' if percent is not None else ""
    cells = [
        f'<td class="id">{text(batch["id"])}</td>',
        f'<td class="state state-{text(batch["status"])}">{text(batch["status"])}</td>',
        f'<td class="model">{text(batch.get("model") or "—")}</td>',
        f'<td class="created">{clock(batch.get("created_at"))}</td>',
        f'<td class="num completed">{counts["completed"]}</td>',
        f'<td class="num failed">{counts["failed"]}</td>',
        f'<td class="num total">{counts["total"]}</td>',
        f'<td class="progress">{bar}{percent_text(percent)}</td>',
        f'<td class="num throughput">{rate}</td>',
        f'<td class="eta">{duration(eta) if running else "—"}</td>',
        f'<td class="errors">{errors_cell(batch)}</td>',
        f'<td class="metadata">{metadata_cell(batch)}</td>',
    ]
    return f'<tr class="batch" id="{text(batch["id"])}">{"".join(cells)}</tr>'


BATCH_HEADINGS = (
    "batch",
    "state",
    "model",
    "created (UTC)",
    "completed",
    "failed",
    "total",
    "progress",
    "throughput",
    "ETA",
    "errors",
    "metadata",
)


def model_row(name: str, loaded: bool) -> str:
    state = "loaded" if loaded else "idle"
    return f'<tr class="served-model" id="model-{text(name)}"><td>{text(name)}</td><td class="loaded">{state}</td></tr>'


def dashboard(
    batches: list[dict], models: dict[str, bool], owner: str, at: float, live: dict[str, dict | None] | None = None
) -> str:
    """The page: the caller's batches (newest first) and every served model, loaded or idle; `live`, the
    running batches' live progress by batch id."""
    live = live or {}
    batch_rows = "".join(batch_row(batch, at, live.get(batch["id"])) for batch in batches) or (
        f'<tr><td colspan="{len(BATCH_HEADINGS)}" class="muted">no batches yet</td></tr>'
    )
    headings = "".join(f"<th>{heading}</th>" for heading in BATCH_HEADINGS)
    model_rows = "".join(model_row(name, loaded) for name, loaded in models.items())
    body = f"""
<h1>Batches</h1>
<p class="muted">for {text(owner)} · {clock(at)} UTC · reloads every {REFRESH_SECONDS} s</p>
<table id="batches"><thead><tr>{headings}</tr></thead><tbody>{batch_rows}</tbody></table>
<h2>Models</h2>
<p class="muted">loaded: a batch of this model is running now</p>
<table id="models"><thead><tr><th>model</th><th>state</th></tr></thead><tbody>{model_rows}</tbody></table>
"""
    return page("vbf serve — batches", body, refresh=True)


def key_form(message: str) -> str:
    """The page when the server has keys and the caller gave none, or a wrong one."""
    body = f"""
<h1>Batches</h1>
<p class="error">{text(message)}</p>
<form method="post" action="/">
  <label>API key <input type="password" name="key" autocomplete="off" size="50"></label>
  <button type="submit">Show my batches</button>
</form>
"""
    return page("vbf serve — API key", body, refresh=False)


def page(title: str, body: str, refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{meta}<title>{text(title)}</title><style>{STYLE}</style></head>
<body>{body}</body></html>
"""
