"""estimate_run: a dry run that prices a job — what it would send, how many tokens, how long, what cost.

It prepares the dataset as a run does (read, validate, dedupe: kept for the run that follows),
counts the requests the results file does not answer yet, tokenizes them with the model's own
tokenizer, and takes the generation rate from a sample run (`sample` requests through the
engine; nothing is stored) or from earlier runs of this model in the results file. No engine
starts unless `sample` asks for one. From the command line: `vbf run --dry-run` (see flows/cli.py).
"""

from __future__ import annotations

from prefect import flow

from blocks import resolve
from blocks.model import InferenceModel
from blocks.store import ResultsStore
from tasks.config import SAMPLE_DATASET, TINY_CPU_MODEL, DatasetSpec, ModelConfig, PricingConfig, SamplingConfig, StoreConfig
from tasks.inference.estimate import RunEstimate, run_estimate
from tasks.inference.job import InferenceJob
from tasks.inference.tasks import count_pending_tokens, fingerprint_model, measure_sample, read_generation_rate
from tasks.prepare.tasks import check_rejected_share, write_requests
from tasks.report.tasks import publish_estimate


@flow(name="estimate-run", log_prints=True)
def estimate_run(
    dataset: DatasetSpec = SAMPLE_DATASET,
    model: ModelConfig | str = TINY_CPU_MODEL,
    sampling: SamplingConfig = SamplingConfig(),
    store: StoreConfig | str = StoreConfig(),
    pricing: PricingConfig = PricingConfig(),
    sample: int = 0,
) -> RunEstimate:
    model, store = resolve(model, InferenceModel), resolve(store, ResultsStore)
    request_set = write_requests(dataset, model.mode, store.storage, model.max_model_len)
    check_rejected_share(request_set, dataset)
    job = InferenceJob(
        model=model, sampling=sampling, model_fingerprint=fingerprint_model(model, store.storage), storage=store.storage
    )
    pending, exact = count_pending_tokens(request_set, job, store)
    throughput = measure_sample(request_set, job, store, sample) if sample else read_generation_rate(job, store)
    counts = request_set.model_dump(include={"rows_read", "rejected", "requests", "unique_requests"})
    estimate = run_estimate(dataset.name, model.model, counts, pending, throughput, pricing, model.tensor_parallel_size, exact)
    publish_estimate(estimate)
    return estimate
