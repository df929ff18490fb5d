"""Prepare: datasets in (sources, parquet, jsonl, dataset), rows to requests (render), checks (validate),
duplicates (dedupe, near_dedupe, kernels), and the cut into content-addressed shards (shard, requests)."""
