"""Inference: one cached task per shard, run in this process or dispatched in groups to workers."""
