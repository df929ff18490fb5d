"""push_for_review: choose outputs of a run and send them to a Label Studio project for human review.

From the command line: `vbf review push RUN_ID --project "Support answers" --strategy lowest`.
"""

from __future__ import annotations

from prefect import flow

from blocks import resolve
from blocks.label_studio import LabelStudio
from tasks.config import SampleSelection, StoreConfig
from tasks.curation.review import label_task_rows
from tasks.curation.tasks import ensure_project, push_samples, read_pushed_samples, remote, select_samples, write_label_tasks
from tasks.report.tasks import publish_push_summary


@flow(name="push-for-review", log_prints=True)
def push_for_review(
    selection: SampleSelection,
    project: str,
    label_studio: str | LabelStudio = "label-studio",
    store: StoreConfig = StoreConfig(),
) -> dict:
    """`label_studio` is the name of a saved Label Studio block, or the connection itself."""
    connection = resolve(label_studio, LabelStudio)
    samples = select_samples(store, selection)
    project_id = remote(ensure_project, connection)(connection, project)
    known = read_pushed_samples(store, connection.url, project_id)
    to_push = [s for s in samples if (s["run_id"], s["custom_id"]) not in known]
    task_ids = remote(push_samples, connection)(connection, project_id, to_push, selection.scorer) if to_push else {}
    rows = label_task_rows(to_push, task_ids, connection.url, project_id, project, selection.strategy)
    write_label_tasks(store, rows)
    summary = {
        "project_id": project_id,
        "selected": len(samples),
        "already_pushed": len(samples) - len(to_push),
        "pushed": len(rows),
    }
    publish_push_summary(project, summary)
    return summary
