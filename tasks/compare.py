"""Compare: variants of one dataset side by side — per-scorer means with CIs and pairwise win rates."""

from __future__ import annotations

import base64
import io

from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from tasks import files
from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, SpecError
from tasks.store import connect, insert_row, migrate


class Variant(BaseModel):
    """One arm of an A/B comparison: what differs from the flow's defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="Short name shown in the views, the table and the chart.")
    model: ModelConfig | None = Field(None, description="Another model (default: the flow's model).")
    sampling: SamplingConfig | None = Field(None, description="Other sampling parameters.")
    system_prompt: str | None = Field(None, description="Another system prompt (a new template: a new dataset version).")
    prompt_template: str | None = Field(None, description="Another prompt template over the row's columns.")


def check_variants(variants: list[Variant]) -> None:
    names = [variant.name for variant in variants]
    if len(variants) < 2:
        raise SpecError(f"variants: a comparison needs at least two, got {len(variants)}")
    if len(set(names)) != len(names):
        raise SpecError(f"variants: names must be unique, got {names}")


def variant_dataset(dataset: DatasetSpec, variant: Variant) -> DatasetSpec:
    update = {}
    if variant.system_prompt is not None:
        update["system_prompt"] = variant.system_prompt
    if variant.prompt_template is not None:
        update |= {"prompt_template": variant.prompt_template, "prompt_column": None}
    return dataset.model_copy(update=update)


class Comparison(BaseModel):
    comparison_id: str
    runs: dict[str, str]  # variant → run_id
    scores: list[dict]  # rows of comparison_scores
    win_rates: list[dict]  # rows of comparison_win_rates


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
    if chart_png:
        lines += ["", f"![mean scores](data:image/png;base64,{base64.b64encode(chart_png).decode()})"]
    return "\n".join(lines)


def draw_chart(scores: list[dict]) -> bytes:
    """Small multiples: one panel per scorer (their scales differ), one bar per variant with its CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


@task(name="write-comparison")
def write_comparison(comparison_id: str, runs: dict[str, str], duckdb_path: str, lock_timeout_seconds: float) -> Comparison:
    """Record which run is which variant, then read the comparison views back."""
    con = connect(duckdb_path, lock_timeout_seconds)
    try:
        migrate(con)
        con.execute("BEGIN")
        for variant, run_id in runs.items():
            insert_row(con, "comparisons", {"comparison_id": comparison_id, "variant": variant, "run_id": run_id})
        con.execute("COMMIT")

        def rows(sql: str) -> list[dict]:
            cursor = con.execute(sql, [comparison_id])
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

        return Comparison(
            comparison_id=comparison_id,
            runs=runs,
            scores=rows("SELECT * FROM comparison_scores WHERE comparison_id = ? ORDER BY scorer, scorer_version, variant"),
            win_rates=rows("SELECT * FROM comparison_win_rates WHERE comparison_id = ? ORDER BY scorer, variant_a, variant_b"),
        )
    finally:
        con.close()


@task(name="publish-comparison")
def publish_comparison(comparison: Comparison, storage: str) -> str:
    """The markdown artifact with its chart; the chart is also kept as a PNG file, whose path is returned."""
    chart = draw_chart(comparison.scores)
    path = files.join(storage, "comparisons", f"{comparison.comparison_id}.png")
    with files.atomic_writer(path) as handle:
        handle.write(chart)
    create_markdown_artifact(
        key="ab-comparison",
        markdown=comparison_markdown(comparison, chart),
        description=f"A/B comparison {comparison.comparison_id}",
    )
    return path
