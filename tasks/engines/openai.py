"""The `openai` engine: any OpenAI-compatible server (vllm serve, a hosted API) over async HTTP, with
bounded concurrency and retries of the answers that may heal (408, 409, 429, 5xx, timeouts)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pyarrow as pa

from tasks.config import ModelConfig, SamplingConfig
from tasks.engines.base import GenerateResult, OutputRecord, output_table, request_columns, request_sampling

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def request_body(model: str, prompt: str | None, messages: str | None, sampling: SamplingConfig) -> dict:
    """The JSON body of one request; only non-default parameters, so strict servers accept it."""
    defaults = SamplingConfig()
    body: dict = {"model": model, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature}
    if messages is not None:
        body["messages"] = json.loads(messages)
    else:
        body["prompt"] = prompt
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    for field in ("top_p", "n", "presence_penalty", "frequency_penalty"):
        if getattr(sampling, field) != getattr(defaults, field):
            body[field] = getattr(sampling, field)
    if sampling.stop:
        body["stop"] = sampling.stop
    for field in ("top_k", "min_p", "repetition_penalty"):  # vLLM extensions
        if getattr(sampling, field) != getattr(defaults, field):
            body[field] = getattr(sampling, field)
    if sampling.logprobs is not None:
        if messages is not None:
            body.update(logprobs=True, top_logprobs=sampling.logprobs)
        else:
            body["logprobs"] = sampling.logprobs
    if sampling.structured is not None:
        s = sampling.structured
        if s.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": s.json_schema}}
        else:  # vLLM's extension for regex and choice
            body["structured_outputs"] = {"regex": s.regex} if s.regex is not None else {"choice": s.choice}
    return body


def choice_records(request_key: str, response: dict, latency: float, chat: bool, logprobs: bool) -> list[OutputRecord]:
    usage = response.get("usage") or {}
    choices = response["choices"]
    rows = []
    for choice in choices:
        if chat:
            text = (choice.get("message") or {}).get("content") or ""
            token_logprobs = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
        else:
            text = choice.get("text") or ""
            token_logprobs = [lp for lp in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if lp is not None]
        rows.append(
            OutputRecord(
                request_key,
                sample_index=choice.get("index", 0),
                text=text,
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=usage.get("prompt_tokens"),
                # usage counts all choices together: per choice only when there is one
                completion_tokens=usage.get("completion_tokens") if len(choices) == 1 else None,
                mean_logprob=sum(token_logprobs) / len(token_logprobs) if logprobs and token_logprobs else None,
                latency_seconds=latency,
            )
        )
    return rows


class OpenAIEngine:
    """The Engine for `engine: openai`. The API key comes in at run time (from a Secret block), never as configuration."""

    def __init__(self, config: ModelConfig, api_key: str | None = None, storage: str | None = None):
        self.config = config  # (storage: this engine keeps nothing between processes)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.requests_sent = 0

    def generate(self, requests: pa.Table, sampling: SamplingConfig, key: str = "") -> GenerateResult:
        started = time.perf_counter()
        outputs = output_table(asyncio.run(self.generate_all(requests, sampling)))
        return GenerateResult(outputs, time.perf_counter() - started, requests.num_rows, None)

    async def generate_all(self, requests: pa.Table, sampling: SamplingConfig) -> list[OutputRecord]:
        limit = asyncio.Semaphore(self.config.max_concurrency)
        timeout = httpx.Timeout(self.config.request_timeout_seconds, connect=30.0)
        base_url = self.config.base_url.rstrip("/") + "/"
        async with httpx.AsyncClient(base_url=base_url, headers=self.headers, timeout=timeout) as client:
            batches = await asyncio.gather(
                *(self.generate_one(client, limit, *row, sampling) for row in request_columns(requests))
            )
        return [record for batch in batches for record in batch]

    async def generate_one(self, client, limit, key, prompt, messages, override, sampling) -> list[OutputRecord]:
        try:
            sampling = request_sampling(sampling, override)
        except ValueError as error:
            return [OutputRecord.failed(key, "invalid_request", str(error))]
        chat = messages is not None
        body = request_body(self.config.model, prompt, messages, sampling)
        path = "chat/completions" if chat else "completions"
        async with limit:
            for attempt in range(self.config.max_retries + 1):
                started = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as error:
                    if attempt == self.config.max_retries:
                        return [OutputRecord.failed(key, "connection_error", f"{type(error).__name__}: {error}")]
                else:
                    if response.status_code == 200:
                        self.requests_sent += 1
                        latency = time.perf_counter() - started
                        return choice_records(key, response.json(), latency, chat, sampling.logprobs is not None)
                    if response.status_code not in RETRY_STATUS or attempt == self.config.max_retries:
                        return [OutputRecord.failed(key, f"http_{response.status_code}", response.text[:2000])]
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")
