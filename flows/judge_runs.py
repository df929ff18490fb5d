"""judge_runs: an LLM judge over runs already in the results file — pairwise (run a's answers against
run b's, or against the reference answers, each pair shown in both orders) or absolute (each answer
graded 1-10 alone). The verdict is constrained with structured output, so every verdict parses.

The judge's prompts are a dataset of their own, run by `batch_inference` on the judge model: a judge
verdict is an output of the judge model for a judge prompt, with the same request keys, shard cache
and resume, so judging the same answers again computes nothing. The verdicts land in
`judge_verdicts`, their sum — wins, ties, the win rate with its Wilson interval and sign test, the
position bias — in `judgements`. From the command line: `vbf judge`.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from blocks import resolve
from blocks.model import InferenceModel
from blocks.store import ResultsStore
from flows.batch_inference import batch_inference
from tasks.config import ShardingConfig, StoreConfig
from tasks.report.summary import RunSummary
from tasks.report.tasks import publish_judgement
from tasks.scoring.judge import JudgeConfig
from tasks.scoring.judgement import JudgedRuns, check_judged_runs
from tasks.scoring.tasks import write_judge_requests, write_verdicts
from tasks.store.rows import JudgementRow
from tasks.store.tasks import commit_judgement


class JudgeResult(BaseModel):
    judgement: JudgementRow
    judge_run: RunSummary  # the judge model's run over the judge prompts


@flow(name="judge-runs", log_prints=True)
def judge_runs(
    run_a: str,
    run_b: str | None = None,
    reference: bool = False,
    judge: JudgeConfig = JudgeConfig(),
    sharding: ShardingConfig = ShardingConfig(),
    store: StoreConfig | str = StoreConfig(),
) -> JudgeResult:
    """Pairwise: give run_b, or reference=True (run_a's requests' reference answers). Absolute: run_a, and run_b if any.
    `store` and the judge's `model` take the configuration or the name of a saved block (the judge-runs deployment
    names `local-results`)."""
    store = resolve(store, ResultsStore)
    judge = judge.model_copy(update={"model": resolve(judge.model, InferenceModel)})
    runs = JudgedRuns(run_a=run_a, run_b=run_b, reference=reference)
    check_judged_runs(runs, judge.kind)
    requests = write_judge_requests(runs, judge, store)
    judged = batch_inference(
        dataset=requests.dataset,
        model=judge.model,
        sampling=judge.judge_sampling(),
        sharding=sharding,
        store=store,
        scorers=[],  # the verdicts are what counts; they are read next
    )
    judgement, verdicts, scores = write_verdicts(requests, judged, judge, store)
    commit_judgement(judgement, [verdicts], scores, store)
    publish_judgement(judgement)
    print(f"judgement {judgement.judgement_id}: SELECT * FROM judgements WHERE judgement_id = '{judgement.judgement_id}'")
    return JudgeResult(judgement=judgement, judge_run=judged)
