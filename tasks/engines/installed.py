"""What the installed vLLM accepts: the fields of its SamplingParams and its reasoning parsers.

Configuration is checked against these before anything runs, so a misspelt field or parser name
fails with its name rather than deep in an engine. Where vLLM is not installed (a client of a
server), there is nothing to check against: the server judges.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import sys

from tasks import console

# SamplingParams fields the engine sets itself, or that change the shape of what it returns (which
# the output records read): not settable through `extra`.
ENGINE_SET = frozenset(
    {"output_kind", "structured_outputs", "flat_logprobs", "skip_clone", "stream_interval", "output_text_buffer_length"}
)


def quietly_imported(module: str):
    """A vLLM module, imported for a look at what it accepts; None where vLLM is not installed. What
    vLLM prints as it loads (a Triton notice) goes to the log file, or nowhere: a check that fails
    says one line."""
    if module not in sys.modules:
        try:
            with console.output_to_log(or_nowhere=True):
                importlib.import_module(module)
        except ImportError:
            return None
        console.route_library_logs()
    return sys.modules[module]


@functools.cache
def sampling_fields() -> tuple[str, frozenset[str]] | None:
    """(vLLM's version, the public fields of its SamplingParams), or None without vLLM."""
    sampling_params = quietly_imported("vllm.sampling_params")
    if sampling_params is None:
        return None
    fields = getattr(sampling_params.SamplingParams, "__struct_fields__", ())
    return sys.modules["vllm"].__version__, frozenset(name for name in fields if not name.startswith("_"))


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
    reasoning = quietly_imported("vllm.reasoning")
    if reasoning is None:
        return
    known = reasoning.ReasoningParserManager.list_registered()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        version = sys.modules["vllm"].__version__
        raise ValueError(f"vLLM {version} has no reasoning parser {name!r}; {hint}it has: {', '.join(known)}")
