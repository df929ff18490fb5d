"""The `openai` engine: any OpenAI-compatible server (vllm serve, a hosted API) over async HTTP, with
bounded concurrency and retries of the answers that may heal (408, 409, 429, 5xx, timeouts).

What still fails after the retries is a transient error row (the next run asks again); a 401 or 403,
or a server that takes no connection, fails the shard instead of filling the run with error rows."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pyarrow as pa

from tasks.config import ModelConfig, SamplingConfig, SpecError
from tasks.engines.base import (
    TRANSIENT,
    GenerateResult,
    OutputRecord,
    ServerUnreachable,
    TokenLogprob,
    output_table,
    request_columns,
    request_sampling,
)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
REFUSED_STATUS = {401, 403}
MAX_RETRY_AFTER_SECONDS = 60.0
# What a model card says about the weights behind a served name. Not `created`: vLLM stamps it with
# the time of the request, so it would change the key of every run.
CARD_FIELDS = ("id", "root", "parent", "owned_by", "max_model_len")


def refused(config: ModelConfig, status: int, request: str, text: str) -> SpecError:
    return SpecError(
        f"openai server at {config.base_url} answered {status} to {request}: the API key "
        f"(Secret block {config.api_key_secret or 'none set: api_key_secret'}) is missing or wrong: {text[:300]}"
    )


def served_model(config: ModelConfig, api_key: str | None) -> dict:
    """The server's model card of `config.model` (GET /models): the served model's identity, checked
    before any work, so a server that is down or refuses the key fails the run at once."""
    url = config.base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=httpx.Timeout(30.0))
    except httpx.TransportError as error:
        raise SpecError(f"openai server at {config.base_url}: cannot connect ({type(error).__name__}: {error})") from error
    if response.status_code in REFUSED_STATUS:
        raise refused(config, response.status_code, "GET /models", response.text)
    if response.status_code == 404:
        return {"id": config.model}  # a server that does not list its models: the name (and revision) is all there is
    if response.status_code != 200:
        raise SpecError(
            f"openai server at {config.base_url} answered {response.status_code} to GET /models: {response.text[:300]}"
        )
    cards = {card.get("id"): card for card in response.json().get("data") or []}
    if config.model not in cards:
        raise SpecError(f"openai server at {config.base_url} does not serve {config.model!r}; it serves {sorted(cards)}")
    return {field: cards[config.model][field] for field in CARD_FIELDS if cards[config.model].get(field) is not None}


def retry_delay(attempt: int, response: httpx.Response | None) -> float:
    """The server's Retry-After (seconds) when it sends one, else exponential backoff with jitter."""
    after = response.headers.get("retry-after") if response is not None else None
    if after is not None and after.replace(".", "", 1).isdigit():
        return min(float(after), MAX_RETRY_AFTER_SECONDS)
    return min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())


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
    if sampling.prompt_logprobs is not None:  # vLLM's extension
        body["prompt_logprobs"] = sampling.prompt_logprobs
    if sampling.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias.items()}
    for field in VLLM_BODY_FIELDS:  # vLLM's extensions, under SamplingParams' names; unset: the server's default
        if getattr(sampling, field) is not None:
            body[field] = getattr(sampling, field)
    body.update(sampling.extra or {})  # what the SDK's extra_body would add: vLLM's server reads them by name
    if sampling.chat_template_kwargs and messages is not None:  # vLLM's extension, for chat requests only
        body["chat_template_kwargs"] = sampling.chat_template_kwargs
    if sampling.structured is not None:
        s = sampling.structured
        if s.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": s.json_schema}}
        elif s.json_object:
            body["response_format"] = {"type": "json_object"}
        else:  # vLLM's extension for regex, choice and grammar
            kind = next(kind for kind in ("regex", "choice", "grammar") if getattr(s, kind) is not None)
            body["structured_outputs"] = {kind: getattr(s, kind)}
    return body


VLLM_BODY_FIELDS = ("min_tokens", "ignore_eos", "stop_token_ids", "bad_words", "skip_special_tokens", "truncate_prompt_tokens")


def choice_records(
    request_key: str, response: dict, latency: float, chat: bool, sampling: SamplingConfig, reasoning: bool = False
) -> list[OutputRecord]:
    """One record per choice; with `reasoning`, the thinking the server split off (vllm serve --reasoning-parser)."""
    usage = response.get("usage") or {}
    choices = response["choices"]
    rows = []
    for choice in choices:
        message = choice.get("message") or {}
        text = message.get("content") or "" if chat else choice.get("text") or ""
        tokens = None
        if sampling.logprobs is not None and choice.get("logprobs"):
            tokens = (
                chat_token_logprobs(choice["logprobs"])
                if chat
                else completion_token_logprobs(choice["logprobs"], sampling.logprobs)
            )
        logprobs = [t["logprob"] for t in tokens or () if t["logprob"] is not None]
        # vLLM answers prompt_logprobs beside the choices (chat) or in each choice (completions)
        prompt = (response if chat else choice).get("prompt_logprobs") if sampling.prompt_logprobs is not None else None
        split = server_split(message, choice.get("finish_reason"), usage, len(choices)) if reasoning and chat else {}
        rows.append(
            OutputRecord(
                request_key,
                sample_index=choice.get("index", 0),
                text=text,
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=usage.get("prompt_tokens"),
                # usage counts all choices together: per choice only when there is one
                completion_tokens=usage.get("completion_tokens") if len(choices) == 1 else None,
                mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None,
                latency_seconds=latency,
                token_logprobs=tokens,
                prompt_logprobs=vllm_prompt_logprobs(prompt, sampling.prompt_logprobs) if prompt else None,
                **split,
            )
        )
    return rows


def server_split(message: dict, finish_reason: str | None, usage: dict, choices: int) -> dict:
    """The thinking a server's reasoning parser split off, and its tokens as the server counts them
    (`reasoning_tokens` of the usage: inside the markers; per choice only when there is one)."""
    reasoning = message.get("reasoning") if message.get("reasoning") is not None else message.get("reasoning_content")
    details = usage.get("completion_tokens_details") or {}
    reasoning_tokens = details.get("reasoning_tokens") if choices == 1 else None
    completion = usage.get("completion_tokens") if choices == 1 else None
    return {
        "reasoning": reasoning,
        "reasoning_tokens": reasoning_tokens,
        "text_tokens": completion - reasoning_tokens if completion is not None and reasoning_tokens is not None else None,
        "reasoning_truncated": finish_reason == "length" and reasoning is not None and not message.get("content"),
    }


def chat_token_logprobs(logprobs: dict) -> list[TokenLogprob]:
    """OpenAI chat's `logprobs.content`: each token with its top alternatives (no token ids)."""
    return [
        {
            "token": t["token"],
            "token_id": None,
            "logprob": t["logprob"],
            "top": [{"token": a["token"], "token_id": None, "logprob": a["logprob"]} for a in t.get("top_logprobs") or []],
        }
        for t in logprobs.get("content") or []
    ]


def completion_token_logprobs(logprobs: dict, top: int) -> list[TokenLogprob]:
    """OpenAI completions' `logprobs`: parallel lists; each place's alternatives are a map that also holds the chosen token."""
    places = logprobs.get("top_logprobs") or []
    entries: list[TokenLogprob] = []
    for i, (token, logprob) in enumerate(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [])):
        alternatives = sorted((places[i] or {}).items(), key=lambda item: -item[1]) if i < len(places) else []
        entries.append(
            {
                "token": token,
                "token_id": None,
                "logprob": logprob,
                "top": [{"token": t, "token_id": None, "logprob": lp} for t, lp in alternatives[:top]],
            }
        )
    return entries


def vllm_prompt_logprobs(places: list, top: int) -> list[TokenLogprob]:
    """vLLM's `prompt_logprobs`: per place a map token id → {logprob, rank, decoded_token}, or null (the first)."""
    entries: list[TokenLogprob] = []
    for place in places:
        if place is None:
            entries.append({"token": None, "token_id": None, "logprob": None, "top": []})
            continue
        chosen_id, chosen = next(iter(place.items()))  # the prompt's own token comes first
        ranked = sorted((p["rank"], int(i), p) for i, p in place.items() if p.get("rank") is not None and p["rank"] <= top)
        entries.append(
            {
                "token": chosen.get("decoded_token"),
                "token_id": int(chosen_id),
                "logprob": chosen["logprob"],
                "top": [{"token": p.get("decoded_token"), "token_id": i, "logprob": p["logprob"]} for _, i, p in ranked],
            }
        )
    return entries


class RequestLoop:
    """The process's one event loop for the openai engine, in a thread of its own. Every shard and part
    that calls a server (however many run at once) sends its requests here, through one concurrency
    limit per server: the requests in flight across the whole run never exceed `max_concurrency`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.limits: dict[tuple[str, int], asyncio.Semaphore] = {}
        threading.Thread(target=self.loop.run_forever, name="openai-requests", daemon=True).start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def limit(self, server: str, size: int) -> asyncio.Semaphore:
        """The server's limit; called in the loop, so no lock is needed."""
        return self.limits.setdefault((server, size), asyncio.Semaphore(size))


_request_loop: RequestLoop | None = None
_request_loop_lock = threading.Lock()


def request_loop() -> RequestLoop:
    global _request_loop
    with _request_loop_lock:
        if _request_loop is None:
            _request_loop = RequestLoop()
        return _request_loop


class OpenAIEngine:
    """The Engine for `engine: openai`. The API key comes in at run time (from a Secret block), never as configuration."""

    def __init__(self, config: ModelConfig, api_key: str | None = None, storage: str | None = None):
        self.config = config  # (storage: this engine keeps nothing between processes)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.requests_sent = 0

    def generate(self, requests: pa.Table, sampling: SamplingConfig, key: str = "") -> GenerateResult:
        started = time.perf_counter()
        outputs = output_table(request_loop().run(self.generate_all(requests, sampling)))
        return GenerateResult(outputs, time.perf_counter() - started, requests.num_rows, None)

    async def generate_all(self, requests: pa.Table, sampling: SamplingConfig) -> list[OutputRecord]:
        limit = request_loop().limit(self.config.base_url, self.config.max_concurrency)
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
                started, response = time.perf_counter(), None
                last = attempt == self.config.max_retries
                try:
                    response = await client.post(path, json=body)
                except httpx.ConnectError as error:
                    if last:
                        raise ServerUnreachable(f"openai server at {self.config.base_url}: cannot connect ({error})") from error
                except (httpx.TimeoutException, httpx.TransportError) as error:
                    if last:
                        message = f"{type(error).__name__}: {error}"
                        return [OutputRecord.failed(key, "connection_error", message, kind=TRANSIENT)]
                else:
                    status = response.status_code
                    if status == 200:
                        self.requests_sent += 1
                        latency = time.perf_counter() - started
                        reasoning = self.config.reasoning_parser is not None
                        return choice_records(key, response.json(), latency, chat, sampling, reasoning)
                    if status in REFUSED_STATUS:
                        raise refused(self.config, status, f"POST /{path}", response.text)
                    if status not in RETRY_STATUS:  # the request's own fault: its answer
                        return [OutputRecord.failed(key, f"http_{status}", response.text[:2000])]
                    if last:
                        return [OutputRecord.failed(key, f"http_{status}", response.text[:2000], kind=TRANSIENT)]
                await asyncio.sleep(retry_delay(attempt, response))
        raise AssertionError("unreachable")
