"""A run's progress artifact is left alone while the process's engine is being built (see Progress:
vLLM's first start holds logging's lock while it drains Prefect's services; a Prefect call then hangs the process)."""

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

from tasks.engines import vllm
from tasks.engines.loop import EngineCounts
from tasks.inference.tasks import Progress
from tasks.report.progress import RunProgress


def artifact_value(artifact_id) -> float:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    return float(artifact.data)


def test_the_progress_artifact_does_not_move_while_the_engine_is_being_built(prefect_harness, monkeypatch):
    engine = {"counts": EngineCounts()}

    @flow
    def watch() -> list[float]:
        display = Progress(RunProgress(total=10, shards=1, live=lambda: engine["counts"]), "ten requests", artifact_seconds=0)
        seen = []
        for counts in (
            EngineCounts(answered=4, starting=True),
            EngineCounts(answered=4),
            EngineCounts(answered=6, starting=True),
        ):
            engine["counts"] = counts
            display.refresh_artifact()
            seen.append(artifact_value(display.artifact))
        display.close()
        return seen

    assert watch() == [0.0, 40.0, 40.0]

    # the process's engine says when it is being built: loading, or restarting after a death
    for state, starting in (("stopped", False), ("loading", True), ("ready", False), ("restarting", True)):
        monkeypatch.setattr(vllm._status, "state", state)
        assert vllm.engine_counts().starting is starting
