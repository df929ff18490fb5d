"""generate_shards: the shard worker. Runs one group of a batch_inference run's shards in one process.

batch_inference(dispatch="workers") starts one run of this flow's deployment per group on the `gpu`
work pool. A process worker starts a fresh process per flow run, so the engine loads once per
group; each shard is the same cached task as in a local run, so finished shards of a failed group
are not computed again when the group is retried.
"""

from __future__ import annotations

from prefect import flow

from tasks.config import SpecError
from tasks.inference.job import InferenceJob
from tasks.inference.tasks import fingerprint_model, generate_here
from tasks.prepare.shard import Shard


@flow(name="generate-shards", log_prints=True)
def generate_shards(shards: list[Shard], job: InferenceJob) -> dict[str, int]:
    if fingerprint_model(job.model, job.storage) != job.model_fingerprint:
        raise SpecError(f"model {job.model.model}: the files on this worker differ from those the run was planned with")
    outputs, cached = generate_here(shards, job, f"{len(shards)} shards on {job.model.model}")
    return {"shards": len(outputs), "cached": sum(cached), "requests": sum(output.requests for output in outputs)}
