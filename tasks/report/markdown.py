"""Markdown for the run page: the run report, the comparison report and the judge report."""

from __future__ import annotations

import base64

from tasks.report.summary import RunSummary
from tasks.scoring.compare import Comparison, better_variant, holm_rejections
from tasks.store.rows import JudgementRow


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


BETTER = {"higher": "higher", "lower": "lower", "none": "– (no winner)"}


def interval(low: float | None, high: float | None) -> str:
    return "–" if low is None or high is None else f"[{fmt(low)}, {fmt(high)}]"


def ordered_pairs(comparison: Comparison) -> set[tuple[str, str]]:
    """Each pair of variants once, in the order the variants were given (the order of the differences)."""
    names = list(comparison.runs)
    return {(a, b) for i, a in enumerate(names) for b in names[i + 1 :]}


def significance(comparison: Comparison) -> list[tuple[bool, bool]]:
    """Per row of comparison.differences: (p below the level, still so after Holm's correction over all rows)."""
    p_values = [row["p_value"] for row in comparison.differences]
    holm = holm_rejections(p_values, comparison.significance_level)
    return [(p < comparison.significance_level, adjusted) for p, adjusted in zip(p_values, holm)]


def findings(comparison: Comparison, significant: list[tuple[bool, bool]]) -> list[str]:
    """One sentence per significant difference, the better variant first where the scorer has a direction."""
    lines = []
    for row, (below, adjusted) in zip(comparison.differences, significant):
        if not below:
            continue
        a, b, scorer = row["variant_a"], row["variant_b"], row["scorer"]
        better = better_variant(row["direction"], a, b, row["mean_diff"])
        what = f"**{better}** is better on `{scorer}`" if better else f"`{scorer}` differs"
        lines.append(
            f"- {what} ({a} {fmt(row['mean_a'])} vs {b} {fmt(row['mean_b'])}; {b} − {a} = {fmt(row['mean_diff'])}, "
            f"95% CI {interval(row['diff_ci95_low'], row['diff_ci95_high'])}, p = {row['p_value']:.3g}, "
            f"n = {row['pairs']}){'' if adjusted else '; not significant after Holm correction'}"
        )
    return lines or [f"- No difference is significant at α = {comparison.significance_level:g}."]


def comparison_markdown(comparison: Comparison, charts: list[tuple[str, bytes]]) -> str:
    """The A/B report: what was compared on how many requests, what differs significantly, then every number."""
    level = comparison.significance_level
    significant = significance(comparison)
    sizes: dict[str, int] = {}
    for row in comparison.scores:
        sizes[row["variant"]] = max(sizes.get(row["variant"], 0), row["n"] + row["unscored"])
    first = comparison.differences[0] if comparison.differences else {"resamples": "–", "seed": "–"}
    lines = [f"# A/B comparison {comparison.comparison_id}", "", "| variant | run | answers scored |", "|---|---|---|"]
    lines += [f"| {variant} | `{run_id}` | {sizes.get(variant, 0)} |" for variant, run_id in comparison.runs.items()]
    lines += [
        "",
        "Pairs are the requests (and samples) both variants answered and a scorer scored; differences are b − a. "
        "Intervals are 95%: means by the normal approximation, win rates by Wilson's score interval (ties count "
        f"half), differences by a paired bootstrap ({first['resamples']} resamples, seed {first['seed']}). "
        "p is an exact two-sided sign test over the pairs that differ (ties left out). "
        f"Significant: p < α = {level:g}; Holm's correction holds the chance of any false finding among the "
        f"{len(comparison.differences)} tests below to α. A scorer whose direction is none has no winner.",
        "",
        "## Findings",
        "",
        *findings(comparison, significant),
        "",
        "## Paired differences of means",
        "",
    ]
    if comparison.differences:
        lines += [
            "| scorer | better is | a | b | pairs | mean a | mean b | b − a | 95% CI (bootstrap) | p (sign test) | "
            f"p < {level:g} | after Holm | better |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['scorer']}@{row['scorer_version']} | {BETTER[row['direction']]} | {row['variant_a']} | "
            f"{row['variant_b']} | {row['pairs']} | {fmt(row['mean_a'])} | {fmt(row['mean_b'])} | {fmt(row['mean_diff'])} | "
            f"{interval(row['diff_ci95_low'], row['diff_ci95_high'])} | {row['p_value']:.3g} | "
            f"{'yes' if below else 'no'} | {'yes' if adjusted else 'no'} | "
            f"{better_variant(row['direction'], row['variant_a'], row['variant_b'], row['mean_diff']) or '–'} |"
            for row, (below, adjusted) in zip(comparison.differences, significant)
        ]
    else:
        lines.append("No scorer scored a request in two variants.")
    pairs = ordered_pairs(comparison)
    directed = [r for r in comparison.win_rates if r["win_rate"] is not None and (r["variant_a"], r["variant_b"]) in pairs]
    lines += ["", "## Win rates (a against b, by each scorer's direction; ties count half)", ""]
    if directed:
        lines += [
            "| scorer | better is | a | b | pairs | wins | losses | ties | win rate | 95% CI (Wilson) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['scorer']}@{row['scorer_version']} | {BETTER[row['direction']]} | {row['variant_a']} | "
            f"{row['variant_b']} | {row['pairs']} | {row['wins']} | {row['losses']} | {row['ties']} | "
            f"{fmt(row['win_rate'])} | {interval(row['win_rate_ci95_low'], row['win_rate_ci95_high'])} |"
            for row in directed
        ]
    else:
        lines.append("No scorer with a direction scored a request in two variants.")
    lines += ["", "## Mean score per variant (95% CI)", ""]
    lines += ["| scorer | better is | variant | n | unscored | mean | 95% CI |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {row['scorer']}@{row['scorer_version']} | {BETTER[row['direction']]} | {row['variant']} | {row['n']} | "
        f"{row['unscored']} | {fmt(row['mean'])} | {interval(row['ci95_low'], row['ci95_high'])} |"
        for row in comparison.scores
    ]
    for alt, png in charts:
        lines += image(alt, png)
    return "\n".join(lines)


def judgement_markdown(judgement: JudgementRow) -> str:
    """The judge report: what was judged by whom, the win rate with its interval and test, the judge's position bias."""
    b = {"run": f"`{judgement.run_b}`", "reference": "the reference answers", "none": "–"}[judgement.against]
    lines = [
        f"# {judgement.kind.capitalize()} judgement {judgement.judgement_id}",
        "",
        f"a = `{judgement.run_a}`, b = {b}; judge `{judgement.judge_model}` (version `{judgement.judge_version}`, "
        f"run `{judgement.judge_run_id}`), "
        f"{judgement.verdict_format} verdicts: {judgement.requests} requests, {judgement.unparseable} unparseable, "
        f"{judgement.judge_errors} failed.",
        "",
    ]
    if judgement.kind == "pairwise":
        lines += [
            "Each pair was shown in both orders; a pair counts for a run only when both orders name it, "
            "otherwise it is inconsistent and counts as a tie. Position bias: the share of inconsistent pairs.",
            "",
        ]
    lines += [
        "| pairs | a wins | b wins | ties | win rate of a | 95% CI (Wilson, ties half) | p (sign test) | position bias "
        "| first shown chosen | mean score a | mean score b | unjudged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {judgement.pairs} | {judgement.a_wins} | {judgement.b_wins} | {judgement.ties} | {fmt(judgement.win_rate)} | "
        f"{interval(judgement.win_rate_ci95_low, judgement.win_rate_ci95_high)} | {fmt(judgement.p_value)} | "
        f"{fmt(judgement.position_bias)} | {fmt(judgement.first_position_rate)} | {fmt(judgement.mean_score_a)} | "
        f"{fmt(judgement.mean_score_b)} | {judgement.unjudged} |",
    ]
    return "\n".join(lines)
