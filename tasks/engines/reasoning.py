"""A reasoning model's answer split in two: the thinking and the final answer, with the tokens of each,
by vLLM's own reasoning parsers (chosen by name, as `vllm serve --reasoning-parser` chooses them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tasks.config import SpecError


@dataclass
class ReasoningSplit:
    reasoning: str | None  # None: the parser found no thinking
    text: str  # the final answer ("" when the budget ran out inside the thinking)
    reasoning_tokens: int  # the completion's tokens before the answer, markers included
    text_tokens: int
    truncated: bool  # finish_reason 'length' before the thinking ended


def reasoning_parser(name: str, tokenizer, chat_template_kwargs: dict | None = None):
    """vLLM's parser `name` for this tokenizer, given the request's chat template variables as vllm serve
    gives them (deepseek_v3 splits only with thinking on); one that does not fit the tokenizer (no thinking
    markers in its vocabulary) is a configuration mistake, named."""
    from vllm.reasoning import ReasoningParserManager

    try:
        return ReasoningParserManager.get_reasoning_parser(name)(tokenizer, chat_template_kwargs=chat_template_kwargs or {})
    except KeyError as error:
        raise SpecError(f"reasoning_parser: {error.args[0]}") from error
    except (RuntimeError, ValueError) as error:
        raise SpecError(f"reasoning_parser {name!r} does not fit this model's tokenizer: {error}") from error


def split_answer(parser, text: str, token_ids: Sequence[int], finish_reason: str | None) -> ReasoningSplit:
    """The answer as the parser reads it: vLLM's text split, its token ids for the counts.

    The answer's tokens are those after the end of the thinking (`extract_content_ids`); the rest are
    the thinking's. The thinking ran out of budget when the answer stopped at max_tokens before the
    parser saw it end (`is_reasoning_end`).
    """
    reasoning, content = parser.extract_reasoning(text, request=None)
    token_ids = list(token_ids)
    text_tokens = len(parser.extract_content_ids(token_ids)) if reasoning is not None else len(token_ids)
    return ReasoningSplit(
        reasoning=reasoning,
        text=content or "",
        reasoning_tokens=len(token_ids) - text_tokens,
        text_tokens=text_tokens,
        truncated=finish_reason == "length" and reasoning is not None and not parser.is_reasoning_end(token_ids),
    )
