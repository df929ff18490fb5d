"""Curation's Prefect tasks: the results file on one side, Label Studio on the other."""

from __future__ import annotations

import json

from prefect import task

from blocks.label_studio import LabelStudio
from tasks import storage
from tasks.config import SampleSelection, StoreConfig
from tasks.curation.curated import curated_record, jsonl_bytes, records_table
from tasks.curation.label_studio import LabelStudioClient, LabelStudioError
from tasks.curation.review import labeling_config, parse_annotation, task_key, task_payload
from tasks.store import curation as curation_store
from tasks.store.connection import reading, writing
from tasks.store.rows import AnnotationRow, CuratedVersionRow, LabelTaskRow

# ---- the results file ---------------------------------------------------------------------------


@task(name="select-samples")
def select_samples(store: StoreConfig, selection: SampleSelection) -> list[dict]:
    """A user's `where` runs in the store's sandbox: it sees the run's candidates and nothing else."""
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        return curation_store.select_samples(con, selection, store.condition_timeout_seconds)


@task(name="read-pushed-samples")
def read_pushed_samples(store: StoreConfig, server_url: str, project_id: int) -> dict[tuple[str, str], int]:
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        return curation_store.pushed_samples(con, server_url, project_id)


@task(name="write-label-tasks")
def write_label_tasks(store: StoreConfig, rows: list[LabelTaskRow]) -> None:
    if rows:
        with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
            curation_store.record_label_tasks(con, rows)


@task(name="write-annotations")
def write_annotations(store: StoreConfig, server_url: str, project_id: int, rows: list[AnnotationRow]) -> dict[str, int]:
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        return curation_store.sync_annotations(con, server_url, project_id, rows)


@task(name="read-curated-records")
def read_curated_records(store: StoreConfig, project: str | None, run_ids: list[str]) -> list[dict]:
    with reading(store.duckdb_path, store.lock_timeout_seconds) as con:
        return [curated_record(row) for row in curation_store.curated_rows(con, project, run_ids)]


@task(name="write-curated-version")
def write_curated_version(store: StoreConfig, output_dir: str, records: list[dict], manifest: dict) -> str:
    """Write the files (atomically, each) first, then record the version: a crash leaves no row."""
    folder = storage.join(output_dir, manifest["name"], manifest["curated_version"])
    storage.write_parquet(records_table(records), storage.join(folder, "curated.parquet"))
    storage.write_bytes(jsonl_bytes(records), storage.join(folder, "curated.jsonl"))
    storage.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", storage.join(folder, "manifest.json"))
    row = CuratedVersionRow(
        curated_version=manifest["curated_version"],
        name=manifest["name"],
        content_hash=manifest["content_hash"],
        source_runs=json.dumps(manifest["source_runs"]),
        path=folder,
        **manifest["counts"],
    )
    with writing(store.duckdb_path, store.lock_timeout_seconds) as con:
        curation_store.record_curated_version(con, row)
    return folder


# ---- Label Studio -------------------------------------------------------------------------------


def retry_when_transient(task, task_run, state) -> bool:
    """Retry network failures and 5xx answers; a 4xx (bad key, bad config) will not heal by waiting."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, LabelStudioError) or error.transient


def remote(task_function, connection: LabelStudio):
    """The task with the connection's retry policy."""
    return task_function.with_options(
        retries=connection.retries,
        retry_delay_seconds=connection.retry_delay_seconds,
        retry_condition_fn=retry_when_transient,
    )


def client(connection: LabelStudio) -> LabelStudioClient:
    return LabelStudioClient(connection.url, connection.api_key.get_secret_value(), connection.timeout_seconds)


@task(name="ensure-project")
def ensure_project(connection: LabelStudio, title: str) -> int:
    with client(connection) as label_studio:
        return label_studio.find_project(title) or label_studio.create_project(
            title, labeling_config(title), description="Pushed by vllm-batch-flows push_for_review."
        )


@task(name="find-project")
def find_project(connection: LabelStudio, title: str) -> int:
    with client(connection) as label_studio:
        project_id = label_studio.find_project(title)
    if project_id is None:
        raise LabelStudioError(f"Label Studio at {connection.url} has no project titled {title!r}", transient=False)
    return project_id


@task(name="push-samples")
def push_samples(connection: LabelStudio, project_id: int, samples: list[dict], scorer: str) -> dict[tuple[str, str], int]:
    """Import the samples the project lacks; return every pushed sample's task id.

    The project itself is asked which samples it holds, so a push that died between the import
    and the DuckDB write does not import the same samples again.
    """
    with client(connection) as label_studio:
        present = held_tasks(label_studio, project_id)
        missing = [s for s in samples if (s["run_id"], s["custom_id"]) not in present]
        if missing:
            label_studio.import_tasks(project_id, [task_payload(s, scorer) for s in missing])
            present = held_tasks(label_studio, project_id)
    return {key: present[key] for key in ((s["run_id"], s["custom_id"]) for s in samples) if key in present}


def held_tasks(label_studio: LabelStudioClient, project_id: int) -> dict[tuple[str, str], int]:
    held = {}
    for item in label_studio.export_tasks(project_id, annotated_only=False):
        key = task_key(item["data"])
        if key is not None:
            held.setdefault(key, item["id"])
    return held


@task(name="fetch-annotations")
def fetch_annotations(connection: LabelStudio, project_id: int) -> list[AnnotationRow]:
    """Every annotation of our tasks in the project, as `annotations` rows (the export holds no secrets)."""
    with client(connection) as label_studio:
        annotated = label_studio.export_tasks(project_id, annotated_only=True)
        emails = label_studio.user_emails()
    return [
        parse_annotation(project_id, item, annotation, emails)
        for item in annotated
        if task_key(item["data"]) is not None
        for annotation in item.get("annotations") or []
    ]
