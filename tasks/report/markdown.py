"""Markdown for the run page: the run report and the comparison report."""

from __future__ import annotations

import base64

from tasks.report.summary import RunSummary
from tasks.scoring.compare import Comparison


def image(alt: str, png: bytes | None) -> list[str]:
    return ["", f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"] if png else []


def format_report(summary: RunSummary, values: dict[str, list[float]], chart_png: bytes | None) -> str:
    """The run page's markdown report: throughput, error rate, where the time went, score distributions."""
    error_rate = summary.errors / summary.outputs if summary.outputs else 0.0
    requests_per_second = summary.engine_requests / summary.wall_seconds if summary.wall_seconds else 0.0
    lines = [
        f"# {summary.dataset_name} on {summary.model}",
        "",
        "| throughput | error rate | cache |",
        "|---|---|---|",
        f"| {summary.tokens_per_second:.1f} generated tokens/s, {requests_per_second:.2f} requests/s "
        f"| {error_rate:.2%} ({summary.errors} of {summary.outputs}) "
        f"| {summary.cached_shards} of {summary.shards} shards |",
        "",
        "**Seconds per stage:** " + ", ".join(f"{k} {v:.1f}" for k, v in summary.stage_seconds.items()),
        "",
        "## Scores",
        "",
        "| scorer | n | mean | min | max |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {len(v)} | {sum(v) / len(v):.3g} | {min(v):.3g} | {max(v):.3g} |" for name, v in sorted(values.items())
    ]
    return "\n".join(lines + image("score distributions", chart_png))


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def comparison_markdown(comparison: Comparison, chart_png: bytes | None) -> str:
    lines = [f"# Comparison {comparison.comparison_id}", "", "| variant | run |", "|---|---|"]
    lines += [f"| {variant} | `{run_id}` |" for variant, run_id in comparison.runs.items()]
    lines += ["", "## Mean score per variant (95% CI)", ""]
    lines += ["| scorer | variant | n | unscored | mean | 95% CI |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {row['scorer']}@{row['scorer_version']} | {row['variant']} | {row['n']} | {row['unscored']} | "
        f"{fmt(row['mean'])} | {fmt(row['ci95_low'])} – {fmt(row['ci95_high'])} |"
        for row in comparison.scores
    ]
    judge = [row for row in comparison.win_rates if row["scorer"].startswith("judge")]
    lines += ["", "## Judge win rates (a vs b; ties count half)", ""]
    if judge:
        lines += ["| scorer | a | b | pairs | wins | losses | ties | win rate |", "|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {row['scorer']} | {row['variant_a']} | {row['variant_b']} | {row['pairs']} | {row['wins']} | "
            f"{row['losses']} | {row['ties']} | {fmt(row['win_rate'])} |"
            for row in judge
        ]
    else:
        lines.append("No pair of answers with a parsed judge score in both variants.")
    return "\n".join(lines + image("mean scores", chart_png))
