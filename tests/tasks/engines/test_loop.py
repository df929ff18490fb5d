"""The engine loop's failure handling, with an engine that dies (no vLLM needed)."""

import types

import pytest

from tasks.config import SamplingConfig


def test_a_dying_engine_fails_the_waiting_shards_instead_of_leaving_them_waiting():
    from tasks.engines.base import EngineRestarted
    from tasks.engines.loop import EngineLoop, PendingRequest, Submission

    class DyingEngine:  # accepts requests, then dies on the first step, as a crashed engine core does
        def add_request(self, *args, **kwargs):
            pass

        def step(self):
            raise RuntimeError("engine core died")

    loop = EngineLoop(types.SimpleNamespace(llm_engine=DyingEngine()), admit_below=8)

    def submission() -> Submission:
        request = PendingRequest("key", [1, 2, 3], SamplingConfig())
        return Submission([request], [types.SimpleNamespace()], None, shared_sampling=True)

    with pytest.raises(RuntimeError, match="engine core died"):
        loop.submit(submission()).wait()
    with pytest.raises(EngineRestarted):  # a stopped loop refuses work rather than queueing it forever
        loop.submit(submission())
