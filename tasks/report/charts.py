"""Charts for the run report and the comparison: small PNGs embedded in markdown artifacts."""

from __future__ import annotations

import io


def pyplot():
    """matplotlib's pyplot on the Agg backend (no screen), imported only when a chart is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    pyplot().close(figure)
    return buffer.getvalue()


def histogram_png(values: dict[str, list[float]]) -> bytes:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(values), figsize=(3.2 * len(values), 2.4), squeeze=False)
    for ax, (scorer, scores) in zip(axes[0], sorted(values.items())):
        ax.hist(scores, bins=min(20, max(1, len(set(scores)))), color="#3b6fd8")
        ax.set_title(scorer, fontsize=9)
        ax.tick_params(labelsize=7)
    return png(figure)


def comparison_chart(scores: list[dict]) -> bytes:
    """Small multiples: one panel per scorer (their scales differ), one bar per variant with its CI."""
    plt = pyplot()
    scorers = sorted({(row["scorer"], row["scorer_version"]) for row in scores if row["mean"] is not None})
    columns = min(4, max(1, len(scorers)))
    rows = -(-len(scorers) // columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for axis, (scorer, version) in zip(axes.flat, scorers):
        panel = [row for row in scores if (row["scorer"], row["scorer_version"]) == (scorer, version) and row["mean"] is not None]
        means = [row["mean"] for row in panel]
        errors = [0.0 if row["ci95_high"] is None else row["ci95_high"] - row["mean"] for row in panel]
        axis.bar([row["variant"] for row in panel], means, yerr=errors, capsize=4, color="#4c72b0")
        axis.set_title(scorer, fontsize=9)
        axis.tick_params(labelsize=8)
    for axis in list(axes.flat)[len(scorers) :]:
        axis.axis("off")
    return png(figure)


def differences_chart(differences: list[dict], significance_level: float) -> bytes:
    """Small multiples: one panel per scorer, one line per pair of variants — b − a with its bootstrap
    95% interval; red where p < significance_level. Zero is no difference."""
    plt = pyplot()
    scorers = sorted({(row["scorer"], row["scorer_version"]) for row in differences})
    columns = min(4, max(1, len(scorers)))
    rows = -(-len(scorers) // columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for axis, (scorer, version) in zip(axes.flat, scorers):
        panel = [row for row in differences if (row["scorer"], row["scorer_version"]) == (scorer, version)]
        for y, row in enumerate(panel):
            color = "#c03d3e" if row["p_value"] < significance_level else "#4c72b0"
            low, high = row["mean_diff"] - row["diff_ci95_low"], row["diff_ci95_high"] - row["mean_diff"]
            axis.errorbar(row["mean_diff"], y, xerr=[[max(low, 0.0)], [max(high, 0.0)]], fmt="o", color=color, capsize=3)
        axis.axvline(0.0, color="#888888", linewidth=0.8)
        axis.set_yticks(range(len(panel)), [f"{row['variant_b']} − {row['variant_a']}" for row in panel])
        axis.set_title(f"{scorer} ({panel[0]['direction']} better)" if panel[0]["direction"] != "none" else scorer, fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(scorers) :]:
        axis.axis("off")
    return png(figure)
