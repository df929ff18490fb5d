"""export_curated: accepted and corrected answers → a versioned curated dataset (Parquet + chat JSONL).

From the command line: `vbf review export --name support-sft --output-dir curated`.
"""

from __future__ import annotations

from prefect import flow

from tasks.config import StoreConfig
from tasks.curation.curated import version_manifest
from tasks.curation.tasks import read_curated_records, write_curated_version
from tasks.report.tasks import publish_curated_summary


@flow(name="export-curated", log_prints=True)
def export_curated(
    name: str,
    output_dir: str = "curated",
    project: str | None = None,
    run_ids: list[str] = [],  # noqa: B006 (Prefect shows the default)
    store: StoreConfig = StoreConfig(),
) -> dict:
    """Same reviews in → same version hash out; a version already recorded is not recorded twice."""
    records = read_curated_records(store, project, run_ids)
    manifest = version_manifest(name, records)
    folder = write_curated_version(store, output_dir, records, manifest)
    publish_curated_summary(manifest, folder)
    return {**manifest, "path": folder}
