"""Engines turn a shard of requests into output records; each implements `base.Engine` and is chosen
by the name in `ModelConfig.engine`.

An engine's module is imported when it is first opened: `vbf run` imports the vLLM engine on its way
to starting it, and an HTTP client (or vLLM) only when a run asks for that engine.
"""

from __future__ import annotations

import importlib

from tasks.config import ModelConfig
from tasks.engines.base import Engine

ENGINES: dict[str, str] = {
    "vllm": "tasks.engines.vllm:SharedVllmEngine",
    "openai": "tasks.engines.openai:OpenAIEngine",
}


def open_engine(model: ModelConfig, api_key: str | None = None, storage: str | None = None) -> Engine:
    """The engine `model.engine` names; `api_key` is for engines that call a server (from a Secret block),
    `storage` the result storage, where an engine keeps what a later process should know (vllm: its batch limits)."""
    module, name = ENGINES[model.engine].split(":")
    return getattr(importlib.import_module(module), name)(model, api_key, storage)
