"""Where results go: the DuckDB file and the storage for shard files and cached task results."""

from __future__ import annotations

from prefect.blocks.core import Block

from tasks.config import StoreConfig


class ResultsStore(Block):
    """The DuckDB results file and the result storage (a folder every worker can reach)."""

    _block_type_name = "Results Store"
    _description = "DuckDB results file and result storage for batch_inference."

    config: StoreConfig
