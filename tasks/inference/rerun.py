"""A rerun: the answers of an earlier run that ran out of token budget, asked again with a larger one."""

from __future__ import annotations

from pydantic import BaseModel

from tasks.config import DatasetSpec, ModelConfig, RerunConfig, SamplingConfig, SpecError


class RerunPlan(BaseModel):
    """The earlier run's dataset, model and sampling as recorded, with the larger budget."""

    model_config = {"protected_namespaces": ()}

    dataset: DatasetSpec
    model: ModelConfig
    sampling: SamplingConfig
    rerun: RerunConfig
    cut_off: int  # answers of the earlier run that were cut off


def rerun_plan(source: dict, rerun: RerunConfig, max_tokens: int | None) -> RerunPlan:
    """From the earlier run's record (`store.queries.rerun_source`): every cut-off answer is asked again
    with `max_tokens` (default: twice the largest budget one of them had), its row's own budget replaced."""
    sampling = SamplingConfig.model_validate_json(source["sampling_params"])
    had = sampling.max_tokens if sampling.max_tokens_wins else max(sampling.max_tokens, source["largest_row_budget"] or 0)
    budget = max_tokens if max_tokens is not None else 2 * had
    if budget <= had:
        raise SpecError(f"max_tokens {budget}: no larger than the budget the cut-off answers of run {rerun.run_id} had ({had})")
    return RerunPlan(
        dataset=DatasetSpec.model_validate_json(source["spec"]),
        model=ModelConfig.model_validate_json(source["engine_args"]),
        sampling=sampling.model_copy(update={"max_tokens": budget, "max_tokens_wins": True}),
        rerun=rerun,
        cut_off=source["cut_off"],
    )
