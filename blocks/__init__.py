"""Prefect Block classes: configuration and secrets only, no workflow logic.

One command registers every block type of this package with the Prefect server (`make blocks`):

    prefect block register -m blocks

`resolve` and `secret_value` are the one way flows and tasks turn a block's name into what it holds.
"""

from importlib import import_module
from pkgutil import iter_modules
from typing import TypeVar

from prefect.blocks.core import Block
from prefect.blocks.system import Secret

# `prefect block register -m` registers the Block classes it finds on this module: expose those
# of every module here, so a new block file needs no edit of this one.
for _module in iter_modules(__path__):
    for _name, _value in vars(import_module(f"{__name__}.{_module.name}")).items():
        if Block.is_block_class(_value) and _value.__module__ == f"{__name__}.{_module.name}":
            globals()[_name] = _value

Value = TypeVar("Value")


def resolve(value: Value | str, block_type: type[Block]) -> Value:
    """The value itself, or what the saved block of that name holds (its `config`, or the block itself)."""
    if not isinstance(value, str):
        return value
    block = block_type.load(value)
    return getattr(block, "config", block)


def secret_value(name: str | None) -> str | None:
    """The value of the Secret block of that name (an API key): loaded at run time, so it is never a
    parameter, a log line or a row."""
    return Secret.load(name).get() if name else None
