"""rescore: recompute scores for a run that is already in DuckDB, without running inference again.

A scorer with a new version (new code, new options, another judge) adds rows beside the old ones;
scores already there are kept.

    python -m flows.rescore RUN_ID --scorer valid_json --scorer my_scorers:shouting
"""

from __future__ import annotations

import argparse

from prefect import flow, task
from pydantic import BaseModel

from tasks import files
from tasks.config import StoreConfig
from tasks.render import content_hash
from tasks.score import ScorerSpec, resolve_scorers, score_outputs, scorers_version
from tasks.store import commit_scores, connect, migrate, read_run_outputs


class RescoreSummary(BaseModel):
    run_id: str
    scorers: str
    outputs: int
    new_scores: int


@task(name="write-run-outputs")
def write_run_outputs(run_id: str, store: StoreConfig) -> tuple[dict, str]:
    """Copy the run's outputs to a file, so the DuckDB file is not held while scorers (a judge) run."""
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    try:
        migrate(con)
        run, table = read_run_outputs(con, run_id)
    finally:
        con.close()
    path = files.join(store.storage, "rescore", content_hash([run_id, "outputs"]), "outputs.parquet")
    files.write_parquet(table, path)
    return run, path


@task(name="write-run-scores")
def write_run_scores(outputs_path: str, specs: list[str | ScorerSpec], storage: str) -> tuple[str, str, int]:
    scorers = resolve_scorers(specs)
    version = scorers_version(scorers)
    outputs = files.read_parquet(outputs_path)
    path = files.join(storage, "scores", f"rescore-{content_hash([outputs_path, version])}.parquet")
    files.write_parquet(score_outputs(outputs, scorers), path)
    return version, path, outputs.num_rows


@task(name="commit-scores")
def commit_run_scores(run: dict, score_path: str, store: StoreConfig) -> int:
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    try:
        return commit_scores(con, run, [score_path])
    finally:
        con.close()


@flow(name="rescore", log_prints=True)
def rescore(run_id: str, scorers: list[str | ScorerSpec], store: StoreConfig = StoreConfig()) -> RescoreSummary:
    run, outputs_path = write_run_outputs(run_id, store)
    version, score_path, outputs = write_run_scores(outputs_path, scorers, store.storage)
    new_scores = commit_run_scores(run, score_path, store)
    print(f"run {run_id}: {outputs} outputs scored with {version}; {new_scores} new score rows")
    return RescoreSummary(run_id=run_id, scorers=version, outputs=outputs, new_scores=new_scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id")
    parser.add_argument("--scorer", action="append", required=True, help="built-in name or package.module:attribute")
    parser.add_argument("--duckdb", default=StoreConfig().duckdb_path)
    parser.add_argument("--storage", default=StoreConfig().storage)
    args = parser.parse_args()
    rescore(args.run_id, args.scorer, StoreConfig(duckdb_path=args.duckdb, storage=args.storage))


if __name__ == "__main__":
    main()
