"""What the installed vLLM accepts: the fields of its SamplingParams and its reasoning parsers.

Configuration is checked against these before anything runs, so a misspelt field or parser name
fails with its name rather than deep in an engine. Where vLLM is not installed (a client of a
server), there is nothing to check against: the server judges.
"""

from __future__ import annotations

import difflib
import functools

# SamplingParams fields the engine sets itself, or that change the shape of what it returns (which
# the output records read): not settable through `extra`.
ENGINE_SET = frozenset(
    {"output_kind", "structured_outputs", "flat_logprobs", "skip_clone", "stream_interval", "output_text_buffer_length"}
)


@functools.cache
def sampling_fields() -> tuple[str, frozenset[str]] | None:
    """(vLLM's version, the public fields of its SamplingParams), or None without vLLM."""
    try:
        from tasks.engines.vllm import import_vllm

        vllm = import_vllm()
    except ImportError:
        return None
    fields = getattr(vllm.SamplingParams, "__struct_fields__", ())
    return vllm.__version__, frozenset(name for name in fields if not name.startswith("_"))


def check_extra_fields(extra: dict, named: set[str]) -> None:
    """Raise ValueError naming the first key of `extra` that is no settable vllm.SamplingParams field.

    `named` are the fields the configuration has under their own name: they are set there.
    """
    installed = sampling_fields()
    for name in extra:
        if name in named:
            raise ValueError(f"{name!r} is a sampling field of its own: set {name} instead of extra.{name}")
        if name in ENGINE_SET:
            raise ValueError(f"{name!r} is set by the engine, not through extra (structured output: `structured`)")
        if installed is None:
            continue
        version, fields = installed
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields | named), n=1)
            hint = ""
            if close:  # a field of the configuration's own is set by its name, not in extra
                hint = f"; did you mean {close[0]!r}?" if close[0] not in named else f"; did you mean the field {close[0]}?"
            raise ValueError(f"{name!r} is not a field of vllm.SamplingParams (vLLM {version}){hint}")


def check_reasoning_parser(name: str) -> None:
    """Raise ValueError unless the installed vLLM has a reasoning parser of this name."""
    try:
        from tasks.engines.vllm import import_vllm

        vllm = import_vllm()
    except ImportError:
        return
    from vllm.reasoning import ReasoningParserManager

    known = ReasoningParserManager.list_registered()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"vLLM {vllm.__version__} has no reasoning parser {name!r}; {hint}it has: {', '.join(known)}")
