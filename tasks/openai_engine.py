"""The `openai` engine: any OpenAI-compatible server (vllm serve, a hosted API) over async HTTP."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pyarrow as pa

from tasks.config import ModelConfig, SamplingConfig
from tasks.engine import OUTPUT_SCHEMA, GenerateResult, error_row, request_sampling

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


def choice_rows(request_key: str, response: dict, latency: float, chat: bool, logprobs: bool) -> list[dict]:
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
            {
                "request_key": request_key,
                "sample_index": choice.get("index", 0),
                "text": text,
                "finish_reason": choice.get("finish_reason"),
                "prompt_tokens": usage.get("prompt_tokens"),
                # usage counts all choices together: per choice only when there is one
                "completion_tokens": usage.get("completion_tokens") if len(choices) == 1 else None,
                "mean_logprob": sum(token_logprobs) / len(token_logprobs) if logprobs and token_logprobs else None,
                "latency_seconds": latency,
                "error_code": None,
                "error": None,
            }
        )
    return rows


class OpenAIEngine:
    def __init__(self, config: ModelConfig, api_key: str | None):
        self.config = config
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.requests_sent = 0

    def generate(self, shard: pa.Table, sampling: SamplingConfig) -> pa.Table:
        rows = asyncio.run(self.generate_all(shard, sampling))
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)

    async def generate_all(self, shard: pa.Table, sampling: SamplingConfig) -> list[dict]:
        overrides = shard["overrides"].to_pylist() if "overrides" in shard.column_names else [None] * shard.num_rows
        limit = asyncio.Semaphore(self.config.max_concurrency)
        timeout = httpx.Timeout(self.config.request_timeout_seconds, connect=30.0)
        async with httpx.AsyncClient(base_url=self.config.base_url.rstrip("/") + "/", headers=self.headers, timeout=timeout) as client:
            batches = await asyncio.gather(
                *(
                    self.generate_one(client, limit, key, prompt, messages, override, sampling)
                    for key, prompt, messages, override in zip(
                        shard["request_key"].to_pylist(), shard["prompt"].to_pylist(), shard["messages"].to_pylist(), overrides
                    )
                )
            )
        return [row for batch in batches for row in batch]

    async def generate_one(self, client, limit, key, prompt, messages, override, sampling) -> list[dict]:
        try:
            sampling = request_sampling(sampling, override)
        except ValueError as error:
            return [error_row(key, "invalid_request", str(error))]
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
                        return [error_row(key, "connection_error", f"{type(error).__name__}: {error}")]
                else:
                    if response.status_code == 200:
                        self.requests_sent += 1
                        return choice_rows(key, response.json(), time.perf_counter() - started, chat, sampling.logprobs is not None)
                    if response.status_code not in RETRY_STATUS or attempt == self.config.max_retries:
                        return [error_row(key, f"http_{response.status_code}", response.text[:2000])]
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")


def generate_over_http(config: ModelConfig, shard: pa.Table, sampling: SamplingConfig) -> GenerateResult:
    """The API key comes from a Prefect Secret block at run time, so it is never a parameter or a log line."""
    from prefect.blocks.system import Secret

    api_key = Secret.load(config.api_key_secret).get() if config.api_key_secret else None
    started = time.perf_counter()
    outputs = OpenAIEngine(config, api_key).generate(shard, sampling)
    return GenerateResult(outputs, time.perf_counter() - started, shard.num_rows, None)
