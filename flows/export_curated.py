"""export_curated: accepted and corrected answers → a versioned curated dataset (Parquet + chat JSONL).

    python -m flows.export_curated --name support-sft --output-dir curated
"""

from __future__ import annotations

import argparse

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.config import StoreConfig
from tasks.curate import read_curated_records, version_manifest, write_curated_version


@task(name="publish-curated-summary")
def publish_curated_summary(manifest: dict, folder: str) -> None:
    counts = manifest["counts"]
    create_markdown_artifact(
        key="export-curated",
        markdown=f"**{manifest['name']}** version `{manifest['curated_version']}`: {counts['examples']} examples "
        f"({counts['accepted']} accepted, {counts['corrected']} corrected) from runs "
        f"{', '.join(manifest['source_runs']) or '—'} → `{folder}`",
    )


@flow(name="export-curated", log_prints=True)
def export_curated(
    name: str,
    output_dir: str = "curated",
    project: str | None = None,
    run_ids: list[str] = [],
    store: StoreConfig = StoreConfig(),
) -> dict:
    """Same reviews in → same version hash out; a version already recorded is not recorded twice."""
    records = read_curated_records(store, project, run_ids)
    manifest = version_manifest(name, records)
    folder = write_curated_version(store, output_dir, records, manifest)
    publish_curated_summary(manifest, folder)
    return {**manifest, "path": folder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="curated dataset name")
    parser.add_argument("--output-dir", default="curated")
    parser.add_argument("--project", help="only reviews from this Label Studio project")
    parser.add_argument("--run-id", action="append", default=[], help="only these runs (repeatable)")
    parser.add_argument("--duckdb", default=StoreConfig().duckdb_path)
    args = parser.parse_args()
    print(export_curated(args.name, args.output_dir, args.project, args.run_id, StoreConfig(duckdb_path=args.duckdb)))


if __name__ == "__main__":
    main()
