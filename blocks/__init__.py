"""Prefect Block classes: configuration and secrets only, no workflow logic.

One command registers every block type of this package with the Prefect server (`make blocks`):

    prefect block register -m blocks
"""

from importlib import import_module
from pkgutil import iter_modules

from prefect.blocks.core import Block

# `prefect block register -m` registers the Block classes it finds on this module: expose those
# of every module here, so a new block file needs no edit of this one.
for _module in iter_modules(__path__):
    for _name, _value in vars(import_module(f"{__name__}.{_module.name}")).items():
        if Block.is_block_class(_value) and _value.__module__ == f"{__name__}.{_module.name}":
            globals()[_name] = _value
