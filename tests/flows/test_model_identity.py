"""Exact cache identity, end to end: a fine-tune saved over the same model folder is a new model."""

from pathlib import Path

import pytest

from flows.batch_inference import batch_inference
from tasks.config import SamplingConfig, ShardingConfig
from tasks.engines.vllm import close_engine

pytestmark = [pytest.mark.slow, pytest.mark.replaces_engine]


def test_new_weights_of_the_same_shape_and_size_send_every_request_to_the_engine_again(
    prefect_harness, tiny_model, tmp_path, sample_spec, store, overwrite_weights, query
):
    folder = tmp_path / "model"
    folder.mkdir()
    for path in Path(tiny_model.model).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    model = tiny_model.model_copy(update={"model": str(folder)})
    spec = sample_spec(40)

    def run():
        return batch_inference(
            dataset=spec, model=model, sampling=SamplingConfig(max_tokens=8), sharding=ShardingConfig(shard_size=16), store=store
        )

    first = run()
    assert first.engine_requests == first.unique_requests > 0
    close_engine()  # a new process, as the next `vbf run` would be: the engine loads the new weights
    overwrite_weights(folder)
    second = run()
    close_engine()

    assert second.model_fingerprint != first.model_fingerprint
    assert (second.engine_requests, second.reused_requests, second.cached_shards) == (first.unique_requests, 0, 0)
    answers = "SELECT custom_id, text FROM run_outputs WHERE run_id = ? AND duplicate_of IS NULL ORDER BY 1"
    old, new = dict(query(store, answers, [first.run_id])), dict(query(store, answers, [second.run_id]))
    assert old.keys() == new.keys() and sum(old[k] != new[k] for k in old) > len(old) / 2
