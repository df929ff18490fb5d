"""A dry run's estimate of a job: what it would send, how many tokens, how long, and at what cost (pure).

Prompt tokens are exact: the model's own tokenizer and chat template, as the vLLM engine applies
them. Output tokens are an upper bound (every request's max_tokens × n) unless a sample run
measured the mean per request. Engine time is output tokens over a generation rate measured on
this machine for this model: by the sample, or by earlier runs in the results file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel

from tasks.config import PricingConfig, SamplingConfig
from tasks.engines.base import request_columns, request_sampling


class PendingTokens(BaseModel):
    """The requests a run would send, with their exact prompt tokens and their most output tokens."""

    requests: int = 0
    prompt_tokens: int = 0
    max_output_tokens: int = 0  # the sum of max_tokens × n over the requests
    samples: int = 0  # the sum of n: answers the run would produce
    unreadable: int = 0  # requests the tokenizer or their overrides reject: the run makes them error rows


class Throughput(BaseModel):
    """Generation measured on this machine for this model: output tokens per engine second."""

    tokens_per_second: float
    output_tokens_per_sample: float | None = None  # a sample run's mean; earlier runs' max_tokens differ
    source: Literal["sample", "earlier runs"]


class RunEstimate(BaseModel):
    dataset_name: str
    model: str
    rows_read: int
    rejected: int
    requests: int
    unique_requests: int
    duplicates: int
    answered_before: int  # unique requests the results file already answers for this model and sampling
    requests_to_send: int
    prompt_tokens: int
    prompt_tokens_exact: bool  # the model's tokenizer; a served model's is not here: characters / 4
    expected_output_tokens: int
    output_tokens_from: Literal["max_tokens", "sample"]
    tokens_per_second: float | None
    throughput_from: Literal["sample", "earlier runs"] | None
    engine_seconds: float | None  # generation only; the engine's start comes on top
    cost: float | None
    cost_basis: str | None


def count_pending(
    tables: Iterable[pa.Table], sampling: SamplingConfig, prompt_token_count: Callable[[str | None, str | None], int]
) -> PendingTokens:
    """Sum a run's pending requests: their prompt tokens and the output tokens they may ask for."""
    counts = PendingTokens()
    for table in tables:
        for _, prompt, messages, overrides in request_columns(table):
            counts.requests += 1
            try:
                request = request_sampling(sampling, overrides)
                prompt_tokens = prompt_token_count(prompt, messages)
            except Exception:  # noqa: BLE001 - the run turns such a request into an error row; it costs nothing
                counts.unreadable += 1
                continue
            counts.prompt_tokens += prompt_tokens
            counts.max_output_tokens += request.max_tokens * request.n
            counts.samples += request.n
    return counts


def expected_output_tokens(pending: PendingTokens, throughput: Throughput | None) -> tuple[int, Literal["max_tokens", "sample"]]:
    if throughput is not None and throughput.output_tokens_per_sample is not None:
        measured = round(throughput.output_tokens_per_sample * pending.samples)
        return min(measured, pending.max_output_tokens), "sample"
    return pending.max_output_tokens, "max_tokens"


def price(engine_seconds: float | None, tokens: int, pricing: PricingConfig, gpus: int) -> tuple[float | None, str | None]:
    """The cost at the user's rate: per GPU-hour (engine time × GPUs), or per million tokens (prompt + output)."""
    if pricing.per_gpu_hour is not None and engine_seconds is not None:
        return (
            engine_seconds / 3600 * gpus * pricing.per_gpu_hour,
            f"{gpus} GPU × engine hours × {pricing.per_gpu_hour:g}/GPU-hour",
        )
    if pricing.per_million_tokens is not None:
        return tokens / 1e6 * pricing.per_million_tokens, f"(prompt + output tokens) / 1M × {pricing.per_million_tokens:g}"
    return None, None


def format_estimate(estimate: RunEstimate) -> str:
    def seconds(value: float | None) -> str:
        return "unknown (no earlier run of this model here; --sample N measures it)" if value is None else f"{value:,.1f} s"

    rows = [
        ("rows read", f"{estimate.rows_read:,}"),
        ("rejected rows", f"{estimate.rejected:,}"),
        ("duplicates", f"{estimate.duplicates:,}"),
        ("unique requests", f"{estimate.unique_requests:,}"),
        ("answered by earlier runs", f"{estimate.answered_before:,}"),
        ("requests to send", f"{estimate.requests_to_send:,}"),
        (f"prompt tokens ({'exact' if estimate.prompt_tokens_exact else 'characters / 4'})", f"{estimate.prompt_tokens:,}"),
        (f"output tokens (from {estimate.output_tokens_from})", f"{estimate.expected_output_tokens:,}"),
        (
            "generation rate",
            "unknown"
            if estimate.tokens_per_second is None
            else f"{estimate.tokens_per_second:,.0f} tokens/s ({estimate.throughput_from})",
        ),
        ("engine time", seconds(estimate.engine_seconds)),
    ]
    if estimate.cost is not None:
        rows.append(("cost", f"{estimate.cost:,.4f}  = {estimate.cost_basis}"))
    width = max(len(label) for label, _ in rows)
    lines = [f"dry run: {estimate.dataset_name} on {estimate.model} (nothing sent, nothing stored)"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def run_estimate(
    dataset_name: str,
    model_name: str,
    counts: dict[str, int],
    pending: PendingTokens,
    throughput: Throughput | None,
    pricing: PricingConfig,
    gpus: int,
    prompt_tokens_exact: bool = True,
) -> RunEstimate:
    """The estimate from the prepared counts (rows_read, rejected, requests, unique_requests), the pending
    requests' tokens, and a measured rate (None: no time, and no cost per GPU-hour)."""
    output_tokens, output_from = expected_output_tokens(pending, throughput)
    engine_seconds = output_tokens / throughput.tokens_per_second if throughput else None
    cost, basis = price(engine_seconds, pending.prompt_tokens + output_tokens, pricing, gpus)
    return RunEstimate(
        dataset_name=dataset_name,
        model=model_name,
        **counts,
        duplicates=counts["requests"] - counts["unique_requests"],
        answered_before=counts["unique_requests"] - pending.requests,
        requests_to_send=pending.requests,
        prompt_tokens=pending.prompt_tokens,
        prompt_tokens_exact=prompt_tokens_exact,
        expected_output_tokens=output_tokens,
        output_tokens_from=output_from,
        tokens_per_second=throughput.tokens_per_second if throughput else None,
        throughput_from=throughput.source if throughput else None,
        engine_seconds=engine_seconds,
        cost=cost,
        cost_basis=basis,
    )
