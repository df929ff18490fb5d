"""Engines turn a shard of requests into output records; each implements `base.Engine` and is chosen
by the name in `ModelConfig.engine`. vLLM itself is imported only when its engine first runs."""

from __future__ import annotations

from collections.abc import Callable

from tasks.config import ModelConfig
from tasks.engines.base import Engine
from tasks.engines.openai import OpenAIEngine
from tasks.engines.vllm import SharedVllmEngine

ENGINES: dict[str, Callable[[ModelConfig, str | None], Engine]] = {
    "vllm": SharedVllmEngine,
    "openai": OpenAIEngine,
}


def open_engine(model: ModelConfig, api_key: str | None = None) -> Engine:
    """The engine `model.engine` names; `api_key` is for engines that call a server (from a Secret block)."""
    return ENGINES[model.engine](model, api_key)
