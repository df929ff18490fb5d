"""Compare: variants of one dataset side by side, and the statistics that say whether they differ.

The views compute means, win rates and Wilson intervals in SQL; what SQL cannot do well — a paired
bootstrap, an exact sign test — is here, in plain Python over the paired values of two variants.
Differences are b − a: positive when b's mean is higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.config import DatasetSpec, ModelConfig, SamplingConfig, SpecError

Z95 = 1.959963984540054  # the normal quantile of 0.975: two-sided 95%
EXACT_SIGN_TEST_LIMIT = 5000  # more pairs than this that differ: the binomial tail summed in log space


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


def check_significance_level(level: float) -> None:
    if not 0 < level < 1:
        raise SpecError(f"significance_level: must be between 0 and 1 (e.g. 0.05), got {level}")


class BootstrapConfig(BaseModel):
    """The paired bootstrap of a difference of means: resamples drawn, and the seed that makes it reproducible."""

    model_config = ConfigDict(extra="forbid")

    resamples: int = Field(2000, ge=100, description="Bootstrap resamples per scorer and pair of variants.")
    seed: int = Field(0, description="Seed of the resampling: the same pairs and seed give the same interval.")


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
    differences: list[dict] = []  # rows of comparison_differences
    significance_level: float = 0.05


def wilson_interval(successes: float, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes may be fractional: ties counted half).
    The same formula as the view `comparison_win_rates`."""
    if trials <= 0:
        raise ValueError("wilson_interval: no trials")
    rate = successes / trials
    center = rate + z * z / (2 * trials)
    spread = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    return (center - spread) / (1 + z * z / trials), (center + spread) / (1 + z * z / trials)


def sign_test_p_value(positive: int, negative: int) -> float:
    """Exact two-sided sign test: the chance of a split at least this uneven among the pairs that
    differ, if each were as likely to go either way (ties are left out, as the test defines)."""
    differing = positive + negative
    if differing == 0:
        return 1.0
    fewer = min(positive, negative)
    if differing <= EXACT_SIGN_TEST_LIMIT:
        term = tail = 1  # C(n, 0), summed up to C(n, fewer) in integers: exact
        for i in range(1, fewer + 1):
            term = term * (differing - i + 1) // i
            tail += term
        return min(1.0, 2 * tail / 2**differing)
    i = np.arange(1, fewer + 1)
    log_terms = np.concatenate([[0.0], np.cumsum(np.log(differing - i + 1) - np.log(i))])  # log C(n, 0..fewer)
    top = log_terms.max()
    log_tail = top + math.log(np.exp(log_terms - top).sum())
    return min(1.0, math.exp(math.log(2) + log_tail - differing * math.log(2)))


def bootstrap_mean_interval(differences: np.ndarray, resamples: int, seed: int, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of paired differences: pairs resampled with replacement, as pairs."""
    values = np.asarray(differences, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    per_chunk = max(1, 4_000_000 // len(values))  # bounded memory: at most ~4M drawn indices at once
    for start in range(0, resamples, per_chunk):
        stop = min(resamples, start + per_chunk)
        means[start:stop] = values[rng.integers(0, len(values), size=(stop - start, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedDifference:
    """Two variants' values on the same requests: means, b − a with its bootstrap 95% interval, sign test."""

    pairs: int
    mean_a: float
    mean_b: float
    mean_diff: float
    diff_ci95_low: float
    diff_ci95_high: float
    b_higher: int
    a_higher: int
    p_value: float


def paired_difference(values_a: list[float], values_b: list[float], bootstrap: BootstrapConfig) -> PairedDifference:
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"paired_difference: needs equal, non-empty pairs, got {len(a)} and {len(b)} values")
    differences = b - a
    low, high = bootstrap_mean_interval(differences, bootstrap.resamples, bootstrap.seed)
    b_higher, a_higher = int((differences > 0).sum()), int((differences < 0).sum())
    return PairedDifference(
        pairs=len(a),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float(differences.mean()),
        diff_ci95_low=low,
        diff_ci95_high=high,
        b_higher=b_higher,
        a_higher=a_higher,
        p_value=sign_test_p_value(b_higher, a_higher),
    )


def difference_record(comparison_id: str, group: dict, bootstrap: BootstrapConfig) -> dict:
    """A row of comparison_differences from one group of `paired_values` (two variants, one scorer)."""
    difference = paired_difference(group["values_a"], group["values_b"], bootstrap)
    keys = {name: group[name] for name in ("variant_a", "variant_b", "scorer", "scorer_version", "direction")}
    return {"comparison_id": comparison_id, **keys, **vars(difference), "resamples": bootstrap.resamples, "seed": bootstrap.seed}


def better_variant(direction: str, variant_a: str, variant_b: str, mean_diff: float) -> str | None:
    """Which variant's mean is better by the scorer's direction (None: no direction, or equal means)."""
    if direction == "none" or mean_diff == 0:
        return None
    return variant_b if (mean_diff > 0) == (direction == "higher") else variant_a


def holm_rejections(p_values: list[float], level: float) -> list[bool]:
    """Holm's step-down correction: which p-values stay significant at `level` when all are tested together."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > level / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected
