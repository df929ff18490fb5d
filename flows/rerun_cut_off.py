"""rerun_cut_off: the answers of a run that ran out of token budget (inside the reasoning, by default),
asked again with a larger one. A new run of the same dataset version whose `rerun_of` names the first;
both attempts stay (the `rerun_attempts` view shows them side by side).

From the command line: `vbf rerun RUN_ID`.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from blocks import resolve
from blocks.store import ResultsStore
from flows.batch_inference import batch_inference
from tasks.config import ModelConfig, RerunConfig, ShardingConfig, StoreConfig
from tasks.inference.tasks import plan_rerun
from tasks.report.summary import RunSummary
from tasks.scoring.registry import DEFAULT_SCORERS
from tasks.scoring.scorers import ScorerSpec


@flow(name="rerun-cut-off", log_prints=True)
def rerun_cut_off(
    run_id: str,
    store: StoreConfig | str = StoreConfig(),
    max_tokens: int | None = None,
    cut_off: Literal["reasoning", "length"] = "reasoning",
    model: ModelConfig | str | None = None,
    sharding: ShardingConfig = ShardingConfig(),
    scorers: list[str | ScorerSpec] = DEFAULT_SCORERS,
) -> RunSummary | None:
    """max_tokens: the new budget (default: twice the largest the cut-off answers had); model: in place
    of the run's as recorded (e.g. a block holding its server's key). None when nothing was cut off."""
    store = resolve(store, ResultsStore)
    plan = plan_rerun(RerunConfig(run_id=run_id, cut_off=cut_off), max_tokens, store)
    if not plan.cut_off:
        print(f"run {run_id}: no answer was cut off ({cut_off}); nothing to ask again")
        return None
    return batch_inference(
        dataset=plan.dataset,
        model=model or plan.model,
        sampling=plan.sampling,
        sharding=sharding,
        store=store,
        scorers=scorers,
        rerun=plan.rerun,
    )
