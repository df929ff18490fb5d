"""pull_reviews: bring a Label Studio project's annotations into DuckDB (run it on a schedule).

From the command line: `vbf review pull --project "Support answers"`.
"""

from __future__ import annotations

from prefect import flow

from blocks import resolve
from blocks.label_studio import LabelStudio
from tasks.config import StoreConfig
from tasks.curation.tasks import fetch_annotations, find_project, remote, write_annotations
from tasks.report.tasks import publish_pull_summary


@flow(name="pull-reviews", log_prints=True)
def pull_reviews(
    project: str, label_studio: str | LabelStudio = "label-studio", store: StoreConfig = StoreConfig()
) -> dict[str, int]:
    """Sync the project's annotations into DuckDB: pulling again changes nothing unless a review changed."""
    connection = resolve(label_studio, LabelStudio)
    project_id = remote(find_project, connection)(connection, project)
    rows = remote(fetch_annotations, connection)(connection, project_id)
    counts = write_annotations(store, connection.url, project_id, rows)
    publish_pull_summary(project, counts)
    return counts
