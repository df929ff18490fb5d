"""Report's Prefect tasks: every artifact a flow run page shows."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks import storage
from tasks.inference.estimate import RunEstimate, format_estimate
from tasks.prepare.requests import RequestSet
from tasks.report.charts import comparison_chart, differences_chart, histogram_png
from tasks.report.markdown import comparison_markdown, format_report, judgement_markdown
from tasks.report.summary import RunSummary, summary_rows
from tasks.scoring.compare import Comparison
from tasks.store.rows import JudgementRow


@task(name="publish-summary")
def publish_summary(summary: RunSummary) -> None:
    create_table_artifact(
        key="batch-inference-summary",
        table=summary_rows(summary),
        description=f"Run {summary.run_id} of {summary.dataset_name} on {summary.model}",
    )


@task(name="publish-validation")
def publish_validation(request_set: RequestSet, dataset_name: str) -> None:
    """The Great Expectations result of the dataset, one row per expectation."""
    create_table_artifact(
        key="dataset-validation",
        table=request_set.validation,
        description=f"Validation of {dataset_name} ({request_set.dataset_version[:12]}): "
        f"{request_set.rejected} of {request_set.rows_read} rows rejected",
    )


def score_values(score_files: list[str]) -> dict[str, list[float]]:
    """Every score value of the run, by scorer."""
    values: dict[str, list[float]] = {}
    for path in score_files:
        table = storage.read_parquet(path, ["scorer", "value"])
        for scorer, value in zip(table["scorer"].to_pylist(), table["value"].to_pylist()):
            if value is not None:
                values.setdefault(scorer, []).append(value)
    return values


@task(name="publish-report")
def publish_report(summary: RunSummary, score_files: list[str]) -> None:
    values = score_values(score_files)
    create_markdown_artifact(
        key="batch-inference-report",
        markdown=format_report(summary, values, histogram_png(values) if values else None),
        description=f"Run report of {summary.run_id}",
    )


@task(name="publish-comparison")
def publish_comparison(comparison: Comparison, storage_root: str) -> str:
    """The A/B report artifact with its charts; the charts are also kept as PNG files (the means chart's path is returned)."""
    charts = [("mean scores", comparison_chart(comparison.scores))]
    if comparison.differences:
        charts.append(("paired differences", differences_chart(comparison.differences, comparison.significance_level)))
    folder = storage.join(storage_root, "comparisons")
    for (_, chart), suffix in zip(charts, ["", "-differences"]):
        storage.write_bytes(chart, storage.join(folder, f"{comparison.comparison_id}{suffix}.png"))
    create_markdown_artifact(
        key="ab-comparison",
        markdown=comparison_markdown(comparison, charts),
        description=f"A/B comparison {comparison.comparison_id}",
    )
    return storage.join(folder, f"{comparison.comparison_id}.png")


@task(name="publish-judgement")
def publish_judgement(judgement: JudgementRow) -> None:
    create_markdown_artifact(
        key="judgement",
        markdown=judgement_markdown(judgement),
        description=f"{judgement.kind.capitalize()} judgement {judgement.judgement_id}",
    )


@task(name="publish-push-summary")
def publish_push_summary(project: str, summary: dict[str, int]) -> None:
    create_markdown_artifact(
        key="push-for-review",
        markdown=f"**{project}** (Label Studio project {summary['project_id']}): {summary['selected']} samples "
        f"selected, {summary['already_pushed']} already in the project, {summary['pushed']} new tasks.",
    )


@task(name="publish-pull-summary")
def publish_pull_summary(project: str, counts: dict[str, int]) -> None:
    create_markdown_artifact(
        key="pull-reviews",
        markdown=f"**{project}**: {counts['pulled']} annotations pulled — {counts['new']} new, "
        f"{counts['changed']} changed, {counts['unchanged']} unchanged; {counts['removed']} deleted in Label Studio "
        "and removed.",
    )


@task(name="publish-curated-summary")
def publish_curated_summary(manifest: dict, folder: str) -> None:
    counts = manifest["counts"]
    create_markdown_artifact(
        key="export-curated",
        markdown=f"**{manifest['name']}** version `{manifest['curated_version']}`: {counts['examples']} examples "
        f"({counts['accepted']} accepted, {counts['corrected']} corrected) from runs "
        f"{', '.join(manifest['source_runs']) or '—'} → `{folder}`",
    )


@task(name="publish-estimate")
def publish_estimate(estimate: RunEstimate) -> None:
    create_markdown_artifact(
        key="batch-inference-estimate",
        markdown=f"```\n{format_estimate(estimate)}\n```",
        description=f"Dry run of {estimate.dataset_name} on {estimate.model}",
    )
