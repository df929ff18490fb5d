"""generate_shards: the shard worker. Runs one group of a batch_inference run's shards in one process.

batch_inference(dispatch="workers") starts one run of this flow's deployment per group on the `gpu`
work pool. A process worker starts a fresh process per flow run, so the engine loads once per
group; each shard is the same cached task as in a local run, so finished shards of a failed group
are not computed again when the group is retried.
"""

from __future__ import annotations

from prefect import flow

from tasks.config import ModelConfig, SamplingConfig, ShardingConfig, SpecError
from tasks.dispatch import submit_shards
from tasks.infer import collect_shard_outputs, fingerprint_model
from tasks.shard import Shard


@flow(name="generate-shards", log_prints=True)
def generate_shards(
    shards: list[Shard],
    model: ModelConfig,
    sampling: SamplingConfig,
    model_fingerprint: str,
    storage: str,
    sharding: ShardingConfig = ShardingConfig(),
) -> dict[str, int]:
    if fingerprint_model(model) != model_fingerprint:
        raise SpecError(f"model {model.model}: the files on this worker differ from those the run was planned with")
    futures = submit_shards(shards, model, sampling, model_fingerprint, storage, sharding)
    outputs, cached = collect_shard_outputs(futures, f"{len(shards)} shards on {model.model}")
    return {"shards": len(outputs), "cached": sum(cached), "requests": sum(output.requests for output in outputs)}
