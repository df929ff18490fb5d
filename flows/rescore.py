"""rescore: recompute scores for a run that is already in DuckDB, without running inference again.

A scorer with a new version (new code, new options, another judge) adds rows beside the old ones;
scores already there are kept. From the command line: `vbf rescore RUN_ID --scorer valid_json`.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from blocks import resolve
from blocks.store import ResultsStore
from tasks.config import StoreConfig
from tasks.scoring.scorers import ScorerSpec
from tasks.scoring.tasks import write_run_outputs, write_run_scores
from tasks.store.tasks import commit_run_scores


class RescoreSummary(BaseModel):
    run_id: str
    scorers: str
    outputs: int
    new_scores: int


@flow(name="rescore", log_prints=True)
def rescore(run_id: str, scorers: list[str | ScorerSpec], store: StoreConfig | str = StoreConfig()) -> RescoreSummary:
    """`store` takes the configuration or the name of a saved block (the rescore deployment names `local-results`)."""
    store = resolve(store, ResultsStore)
    run, outputs_path = write_run_outputs(run_id, store)
    version, score_path, outputs = write_run_scores(outputs_path, scorers, store.storage)
    new_scores = commit_run_scores(run, [score_path], store)
    print(f"run {run_id}: {outputs} outputs scored with {version}; {new_scores} new score rows")
    return RescoreSummary(run_id=run_id, scorers=version, outputs=outputs, new_scores=new_scores)
