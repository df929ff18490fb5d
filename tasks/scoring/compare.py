"""Compare: variants of one dataset side by side — per-scorer means with CIs and pairwise win rates."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, SpecError


class Variant(BaseModel):
    """One arm of an A/B comparison: what differs from the flow's defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="Short name shown in the views, the table and the chart.")
    model: ModelConfig | None = Field(None, description="Another model (default: the flow's model).")
    sampling: SamplingConfig | None = Field(None, description="Other sampling parameters.")
    system_prompt: str | None = Field(None, description="Another system prompt (a new template: a new dataset version).")
    prompt_template: str | None = Field(None, description="Another prompt template over the row's columns.")


def check_variants(variants: list[Variant]) -> None:
    names = [variant.name for variant in variants]
    if len(variants) < 2:
        raise SpecError(f"variants: a comparison needs at least two, got {len(variants)}")
    if len(set(names)) != len(names):
        raise SpecError(f"variants: names must be unique, got {names}")


def variant_dataset(dataset: DatasetSpec, variant: Variant) -> DatasetSpec:
    update = {}
    if variant.system_prompt is not None:
        update["system_prompt"] = variant.system_prompt
    if variant.prompt_template is not None:
        update |= {"prompt_template": variant.prompt_template, "prompt_column": None}
    return dataset.model_copy(update=update)


class Comparison(BaseModel):
    comparison_id: str
    runs: dict[str, str]  # variant → run_id
    scores: list[dict]  # rows of comparison_scores
    win_rates: list[dict]  # rows of comparison_win_rates
