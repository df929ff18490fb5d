"""pull_reviews: bring a Label Studio project's annotations into DuckDB (run it on a schedule).

    python -m flows.pull_reviews --project "Support answers" --block my-label-studio
"""

from __future__ import annotations

import argparse

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from blocks.label_studio import LabelStudio
from tasks.config import StoreConfig
from tasks.curate import fetch_annotations, find_project, load_connection, remote, write_annotations


@task(name="publish-pull-summary")
def publish_pull_summary(project: str, counts: dict[str, int]) -> None:
    create_markdown_artifact(
        key="pull-reviews",
        markdown=f"**{project}**: {counts['pulled']} annotations pulled — {counts['new']} new, "
        f"{counts['changed']} changed, {counts['unchanged']} unchanged; {counts['removed']} deleted in Label Studio "
        "and removed.",
    )


@flow(name="pull-reviews", log_prints=True)
def pull_reviews(
    project: str,
    label_studio: str | LabelStudio = "label-studio",
    store: StoreConfig = StoreConfig(),
) -> dict[str, int]:
    """Sync the project's annotations into DuckDB: pulling again changes nothing unless a review changed."""
    connection = load_connection(label_studio)
    project_id = remote(find_project, connection)(connection, project)
    rows = remote(fetch_annotations, connection)(connection, project_id)
    counts = write_annotations(store, connection.url, project_id, rows)
    publish_pull_summary(project, counts)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", required=True)
    parser.add_argument("--block", default="label-studio", help="name of the saved Label Studio block")
    parser.add_argument("--duckdb", default=StoreConfig().duckdb_path)
    args = parser.parse_args()
    print(pull_reviews(args.project, args.block, StoreConfig(duckdb_path=args.duckdb)))


if __name__ == "__main__":
    main()
