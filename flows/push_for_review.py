"""push_for_review: choose outputs of a run and send them to a Label Studio project for human review.

    python -m flows.push_for_review --run-id <run> --block my-label-studio --project "Support answers" \
        --strategy lowest --scorer completion_tokens --limit 50
"""

from __future__ import annotations

import argparse

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from blocks.label_studio import LabelStudio
from tasks.config import StoreConfig
from tasks.curate import (
    SampleSelection,
    ensure_project,
    load_connection,
    push_samples,
    read_pushed_samples,
    remote,
    select_samples,
    write_label_tasks,
)


def label_task_rows(
    samples: list[dict], task_ids: dict, connection: LabelStudio, project_id: int, title: str, strategy: str
) -> list[dict]:
    return [
        {
            "server_url": connection.url, "project_id": project_id, "project_title": title,
            "run_id": s["run_id"], "custom_id": s["custom_id"], "output_id": s["output_id"],
            "task_id": task_ids[(s["run_id"], s["custom_id"])], "strategy": strategy,
        }  # fmt: skip
        for s in samples
        if (s["run_id"], s["custom_id"]) in task_ids
    ]


@task(name="publish-push-summary")
def publish_push_summary(project: str, summary: dict[str, int]) -> None:
    create_markdown_artifact(
        key="push-for-review",
        markdown=f"**{project}** (Label Studio project {summary['project_id']}): {summary['selected']} samples "
        f"selected, {summary['already_pushed']} already in the project, {summary['pushed']} new tasks.",
    )


@flow(name="push-for-review", log_prints=True)
def push_for_review(
    selection: SampleSelection,
    project: str,
    label_studio: str | LabelStudio = "label-studio",
    store: StoreConfig = StoreConfig(),
) -> dict:
    """`label_studio` is the name of a saved Label Studio block, or the connection itself."""
    connection = load_connection(label_studio)
    samples = select_samples(store, selection)
    project_id = remote(ensure_project, connection)(connection, project)
    known = read_pushed_samples(store, connection.url, project_id)
    to_push = [s for s in samples if (s["run_id"], s["custom_id"]) not in known]
    task_ids = remote(push_samples, connection)(connection, project_id, to_push, selection.scorer) if to_push else {}
    rows = label_task_rows(to_push, task_ids, connection, project_id, project, selection.strategy)
    write_label_tasks(store, rows)
    summary = {"project_id": project_id, "selected": len(samples), "already_pushed": len(samples) - len(to_push), "pushed": len(rows)}
    publish_push_summary(project, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--project", required=True, help="Label Studio project title (created if missing)")
    parser.add_argument("--block", default="label-studio", help="name of the saved Label Studio block")
    parser.add_argument("--strategy", default="lowest", choices=["lowest", "stratified", "disagreement", "where"])
    parser.add_argument("--scorer", default="completion_tokens")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--other-run-id")
    parser.add_argument("--where")
    parser.add_argument("--duckdb", default=StoreConfig().duckdb_path)
    args = parser.parse_args()
    selection = SampleSelection(
        run_id=args.run_id, strategy=args.strategy, scorer=args.scorer, limit=args.limit,
        other_run_id=args.other_run_id, where=args.where,
    )  # fmt: skip
    print(push_for_review(selection, args.project, args.block, StoreConfig(duckdb_path=args.duckdb)))


if __name__ == "__main__":
    main()
