"""push_for_review → review in a real Label Studio → pull_reviews → export_curated, on a real run."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from blocks.label_studio import LabelStudio
from flows.batch_inference import batch_inference
from flows.export_curated import export_curated
from flows.pull_reviews import pull_reviews
from flows.push_for_review import push_for_review
from tasks.config import DatasetSpec, SampleSelection, SamplingConfig, ShardingConfig, StoreConfig
from tasks.curation.label_studio import LabelStudioError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKEN = "curation-test-token-5f2c9a"
REVIEWER = "reviewer@example.com"
CURATION_TABLES = ["label_tasks", "annotations", "curated_versions"]


def load_server_script():
    spec = importlib.util.spec_from_file_location("label_studio_server", REPO / "scripts" / "label_studio_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def label_studio_url(tmp_path_factory):
    """A throwaway Label Studio on 127.0.0.1 with a preset user and token; stopped even on failure,
    and as soon as this module is done (other tests count the session's child processes)."""
    server = load_server_script()
    server.ensure_installed()
    port = server.free_port()
    process = server.start(tmp_path_factory.mktemp("label-studio"), port, REVIEWER, "reviewer-password-1", TOKEN)
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_until_ready(process, url)
        yield url
    finally:
        server.stop(process)
        with pytest.raises(ProcessLookupError):  # nothing of the server's process group is left
            os.killpg(process.pid, 0)


@pytest.fixture(scope="module")
def connection(label_studio_url) -> LabelStudio:
    return LabelStudio(url=label_studio_url, api_key=TOKEN, retries=1, retry_delay_seconds=0)


@pytest.fixture(scope="module")
def runs(prefect_harness, tiny_model, tmp_path_factory, sample_parquet):
    """Two real runs over the same 40 prompts: greedy, and sampled (so some answers differ)."""
    folder = tmp_path_factory.mktemp("curation")
    source = folder / "slice.parquet"
    pq.write_table(pq.read_table(sample_parquet).slice(0, 40), source)
    dataset = DatasetSpec(name="curation", source=str(source), id_column="id", prompt_column="prompt", system_prompt="Be brief.")
    store = StoreConfig(duckdb_path=str(folder / "results.duckdb"), storage=str(folder / "storage"))
    greedy = batch_inference(
        dataset=dataset,
        model=tiny_model,
        sampling=SamplingConfig(max_tokens=8),
        sharding=ShardingConfig(shard_size=64),
        store=store,
    )
    sampled = batch_inference(
        dataset=dataset,
        model=tiny_model,
        sampling=SamplingConfig(max_tokens=8, temperature=1.0, seed=3),
        sharding=ShardingConfig(shard_size=64),
        store=store,
    )
    return store, greedy.run_id, sampled.run_id


def api(connection: LabelStudio) -> httpx.Client:
    """The reviewer's side: plain HTTP, as the Label Studio UI would send it."""
    return httpx.Client(base_url=connection.url, headers={"Authorization": f"Token {TOKEN}"}, timeout=30)


def project_tasks(connection: LabelStudio, project_id: int) -> list[dict]:
    with api(connection) as client:
        answer = client.get(f"/api/projects/{project_id}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
        answer.raise_for_status()
        return answer.json()


def review(verdict: str, rating: int | None = None, corrected: str | None = None) -> list[dict]:
    result = [{"from_name": "verdict", "to_name": "response", "type": "choices", "value": {"choices": [verdict]}}]
    if rating is not None:
        result.append({"from_name": "rating", "to_name": "response", "type": "rating", "value": {"rating": rating}})
    if corrected is not None:
        result.append({"from_name": "corrected", "to_name": "response", "type": "textarea", "value": {"text": [corrected]}})
    return result


def test_push_review_pull_export_round_trip(runs, connection, tmp_path, query, snapshot):
    store, run_id, _ = runs
    selection = SampleSelection(run_id=run_id, strategy="lowest", scorer="completion_tokens", limit=5)

    first = push_for_review(selection, "Round trip", connection, store)
    again = push_for_review(selection, "Round trip", connection, store)

    tasks = project_tasks(connection, first["project_id"])
    assert (first["selected"], first["pushed"]) == (5, 5) and (again["already_pushed"], again["pushed"]) == (5, 0)
    assert len(tasks) == 5  # the second push created no duplicate
    mapped = dict(query(store, "SELECT custom_id, task_id FROM label_tasks WHERE project_title = 'Round trip'"))
    assert mapped == {t["data"]["custom_id"]: t["id"] for t in tasks}
    # each task carries the run's real answer and a prediction pre-filled from the scores
    outputs = dict(query(store, "SELECT custom_id, coalesce(text, '') FROM run_outputs WHERE run_id = ?", [run_id]))
    assert all(t["data"]["response"] == outputs[t["data"]["custom_id"]] and t["total_predictions"] == 1 for t in tasks)

    ordered = sorted(tasks, key=lambda t: t["data"]["custom_id"])
    with api(connection) as client:
        made = [
            client.post(f"/api/tasks/{ordered[0]['id']}/annotations", json={"result": review("accept", 5)}),
            client.post(
                f"/api/tasks/{ordered[1]['id']}/annotations", json={"result": review("reject", 2, "A corrected answer.")}
            ),
            client.post(f"/api/tasks/{ordered[2]['id']}/annotations", json={"result": review("reject", 1)}),
            client.post(f"/api/tasks/{ordered[3]['id']}/annotations", json={"result": [], "was_cancelled": True}),
        ]
        assert all(response.status_code == 201 for response in made), [r.text for r in made]

    pulled = pull_reviews("Round trip", connection, store)
    assert pulled == {"pulled": 4, "new": 4, "changed": 0, "unchanged": 0, "removed": 0}
    rows = query(
        store, "SELECT custom_id, annotator, verdict, rating, corrected_text, cancelled FROM annotations ORDER BY custom_id"
    )
    ids = [t["data"]["custom_id"] for t in ordered]
    assert rows == [
        (ids[0], REVIEWER, "accept", 5, None, False),
        (ids[1], REVIEWER, "reject", 2, "A corrected answer.", False),
        (ids[2], REVIEWER, "reject", 1, None, False),
        (ids[3], REVIEWER, None, None, None, True),
    ]
    before = snapshot(store)
    assert pull_reviews("Round trip", connection, store) == {"pulled": 4, "new": 0, "changed": 0, "unchanged": 4, "removed": 0}
    assert snapshot(store) == before

    with api(connection) as client:
        changed = client.patch(f"/api/annotations/{made[2].json()['id']}", json={"result": review("accept", 4)})
        deleted = client.delete(f"/api/annotations/{made[3].json()['id']}")
        assert (changed.status_code, deleted.status_code) == (200, 204), changed.text + deleted.text
    assert pull_reviews("Round trip", connection, store) == {"pulled": 3, "new": 0, "changed": 1, "unchanged": 2, "removed": 1}
    assert query(store, "SELECT verdict, rating FROM annotations WHERE custom_id = ?", [ids[2]]) == [("accept", 4)]
    assert query(store, "SELECT count(*) FROM annotations WHERE custom_id = ?", [ids[3]]) == [(0,)]

    curated = export_curated("round-trip", str(tmp_path / "curated"), "Round trip", [], store)
    assert curated["counts"] == {"examples": 3, "accepted": 2, "corrected": 1} and curated["source_runs"] == [run_id]
    folder = Path(curated["path"])
    lines = [json.loads(line) for line in (folder / "curated.jsonl").read_text().splitlines()]
    table = pq.read_table(folder / "curated.parquet").to_pylist()
    assert [row["custom_id"] for row in table] == sorted([ids[0], ids[1], ids[2]])
    by_id = {row["custom_id"]: json.loads(row["messages"]) for row in table}
    assert by_id[ids[1]][-1] == {"role": "assistant", "content": "A corrected answer."}  # corrected text wins
    assert by_id[ids[0]][-1] == {"role": "assistant", "content": outputs[ids[0]]}
    assert by_id[ids[0]][0] == {"role": "system", "content": "Be brief."}
    assert [line["messages"] for line in lines] == [by_id[row["custom_id"]] for row in table]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["curated_version"] == curated["curated_version"] and manifest["content_hash"] == curated["content_hash"]

    repeat = export_curated("round-trip", str(tmp_path / "curated"), "Round trip", [], store)
    assert repeat["curated_version"] == curated["curated_version"]
    assert query(store, "SELECT curated_version, examples, accepted, corrected FROM curated_versions") == [
        (curated["curated_version"], 3, 2, 1)
    ]
    # the API key is nowhere in the results file
    assert TOKEN not in json.dumps(snapshot(store))


def test_other_strategies_push_what_they_select(runs, connection, query):
    store, greedy, sampled = runs
    stratified = push_for_review(
        SampleSelection(run_id=greedy, strategy="stratified", scorer="completion_tokens", buckets=3, limit=6, seed=1),
        "Stratified",
        connection,
        store,
    )
    differing = query(
        store,
        """SELECT count(*) FROM run_outputs a JOIN run_outputs b USING (custom_id)
           WHERE a.run_id = ? AND b.run_id = ? AND a.duplicate_of IS NULL AND a.error_code IS NULL
             AND b.error_code IS NULL AND a.text IS DISTINCT FROM b.text""",
        [greedy, sampled],
    )[0][0]
    assert differing > 0
    disagreement = push_for_review(
        SampleSelection(run_id=greedy, strategy="disagreement", other_run_id=sampled, limit=3), "A/B", connection, store
    )
    where = push_for_review(
        SampleSelection(run_id=greedy, strategy="where", where="finish_reason = 'length'", limit=4),
        "Truncated",
        connection,
        store,
    )

    assert stratified["pushed"] == 6
    assert disagreement["pushed"] == 2 * min(3, differing)
    pairs = query(store, "SELECT custom_id, count(DISTINCT run_id) FROM label_tasks WHERE project_title = 'A/B' GROUP BY ALL")
    assert all(runs_per_sample == 2 for _, runs_per_sample in pairs)
    assert len(project_tasks(connection, disagreement["project_id"])) == disagreement["pushed"]
    truncated = query(
        store, "SELECT count(*) FROM run_outputs WHERE run_id = ? AND duplicate_of IS NULL AND finish_reason = 'length'", [greedy]
    )[0][0]
    assert where["pushed"] == min(4, truncated)


def test_flows_take_a_saved_block_by_name(runs, connection):
    store, run_id, _ = runs
    connection.save("curation-test", overwrite=True)
    pushed = push_for_review(SampleSelection(run_id=run_id, limit=2), "By block name", "curation-test", store)
    assert pushed["pushed"] == 2
    assert pull_reviews("By block name", "curation-test", store)["pulled"] == 0


def test_a_personal_access_token_works_as_the_api_key(runs, connection):
    store, run_id, _ = runs
    with api(connection) as client:
        created = client.post("/api/token/")  # Account settings → Personal Access Token, through the API
        assert created.status_code == 201, created.text
    personal = LabelStudio(url=connection.url, api_key=created.json()["token"], retries=0)
    assert push_for_review(SampleSelection(run_id=run_id, limit=2), "With a personal token", personal, store)["pushed"] == 2


def ensure_project_run_count(flow_state) -> int:
    """How often the flow's ensure-project task ran (task runs reach the API shortly after they end)."""
    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            ensure = [run for run in runs if run.name.startswith("ensure-project") and run.state and run.state.is_final()]
            if ensure or time.monotonic() > deadline:
                return ensure[0].run_count if ensure else 0
            time.sleep(0.5)


def test_unreachable_server_is_retried_then_fails_clearly_and_changes_nothing(runs, snapshot):
    store, run_id, _ = runs
    nowhere = LabelStudio(
        url=f"http://127.0.0.1:{load_server_script().free_port()}", api_key=TOKEN, retries=2, retry_delay_seconds=0
    )
    before = snapshot(store)

    state = push_for_review(SampleSelection(run_id=run_id, limit=3), "Never created", nowhere, store, return_state=True)

    assert state.is_failed()
    with pytest.raises(LabelStudioError, match=r"Label Studio at http://127\.0\.0\.1:\d+ is unreachable") as error:
        state.result()
    assert TOKEN not in str(error.value)
    assert ensure_project_run_count(state) == 3  # the first try and two retries
    assert snapshot(store) == before
    with pytest.raises(LabelStudioError, match="unreachable"):
        pull_reviews("Never created", nowhere, store)
    assert snapshot(store) == before


def test_a_wrong_api_key_is_not_retried_and_names_the_block(runs, label_studio_url, snapshot):
    store, run_id, _ = runs
    wrong = LabelStudio(url=label_studio_url, api_key="not-the-token-0000", retries=2, retry_delay_seconds=0)
    before = snapshot(store)

    state = push_for_review(SampleSelection(run_id=run_id, limit=3), "Never created", wrong, store, return_state=True)

    with pytest.raises(LabelStudioError, match="answered 401 .* check the API key of the Label Studio block") as error:
        state.result()
    assert "not-the-token-0000" not in str(error.value)
    assert ensure_project_run_count(state) == 1
    with get_client(sync_client=True) as client:  # the flow run's stored parameters hold the key masked
        parameters = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert "not-the-token-0000" not in json.dumps(parameters, default=str)
    assert snapshot(store) == before
