"""Review in Label Studio: the labeling config, the task a reviewer sees, the annotation that comes back,
the curated version's hash, and which Label Studio errors are retried."""

import json
import xml.etree.ElementTree as ET

import pytest
from prefect.states import Failed
from pydantic import ValidationError

from tasks.config import SampleSelection
from tasks.curation.curated import version_manifest
from tasks.curation.label_studio import LabelStudioError
from tasks.curation.review import labeling_config, parse_annotation, task_payload
from tasks.curation.tasks import retry_when_transient


@pytest.mark.parametrize(
    "fields, message",
    [({"strategy": "disagreement"}, "other_run_id"), ({"strategy": "where", "where": " "}, "where"), ({"limit": 0}, "limit")],
)
def test_selection_names_the_missing_input(fields, message):
    with pytest.raises(ValidationError, match=message):
        SampleSelection(run_id="A", **fields)


def test_labeling_config_is_xml_with_the_review_controls():
    view = ET.fromstring(labeling_config('Answers <&> "v2"'))
    names = {element.get("name"): element.tag for element in view.iter() if element.get("name")}
    assert names == {
        "prompt": "Text",
        "response": "Text",
        "scores": "Text",
        "verdict": "Choices",
        "rating": "Rating",
        "corrected": "TextArea",
    }
    assert [c.get("value") for c in view.iter("Choice")] == ["accept", "reject"]
    assert view.find("Rating").get("maxRating") == "5"


def test_task_payload_prefills_the_verdict_from_scores():
    sample = {
        "run_id": "A",
        "custom_id": "q1",
        "output_id": "o1",
        "prompt": "hi",
        "messages": json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]),
        "response": "",
        "scores": json.dumps({"empty_output": 1.0, "completion_tokens": 0.0}),
    }
    payload = task_payload(sample, "completion_tokens")
    assert payload["data"]["prompt"] == "[system] Be brief.\n\n[user] hi"
    assert payload["data"]["scores"] == "completion_tokens = 0 · empty_output = 1"
    (prediction,) = payload["predictions"]
    assert prediction["score"] == 0.0 and prediction["result"][0]["value"] == {"choices": ["reject"]}
    fine = task_payload({**sample, "response": "ok", "scores": json.dumps({"empty_output": 0.0})}, "completion_tokens")
    assert fine["predictions"][0]["result"][0]["value"] == {"choices": ["accept"]} and fine["predictions"][0]["score"] is None


# An annotated task as Label Studio 1.23 exports it (trimmed).
EXPORTED_TASK = {
    "id": 7,
    "project": 3,
    "data": {"run_id": "A", "custom_id": "q2", "output_id": "o2", "prompt": "p", "response": "r"},
    "annotations": [
        {
            "id": 11,
            "completed_by": 1,
            "was_cancelled": False,
            "created_at": "2026-11-26T21:03:42.885251Z",
            "updated_at": "2026-11-26T21:04:00.000000Z",
            "result": [
                {"from_name": "verdict", "to_name": "response", "type": "choices", "value": {"choices": ["reject"]}},
                {"from_name": "rating", "to_name": "response", "type": "rating", "value": {"rating": 2}},
                {"from_name": "corrected", "to_name": "response", "type": "textarea", "value": {"text": ["better", "answer"]}},
            ],
        }
    ],
}


def test_parse_annotation_reads_verdict_rating_correction_and_annotator():
    row = parse_annotation(3, EXPORTED_TASK, EXPORTED_TASK["annotations"][0], {1: "rev@example.com"})
    assert row.model_dump() == {
        "annotation_id": 11,
        "task_id": 7,
        "project_id": 3,
        "run_id": "A",
        "custom_id": "q2",
        "output_id": "o2",
        "annotator": "rev@example.com",
        "verdict": "reject",
        "rating": 2,
        "corrected_text": "better\nanswer",
        "cancelled": False,
        "created_at": "2026-11-26T21:03:42.885251Z",
        "updated_at": "2026-11-26T21:04:00.000000Z",
    }
    skipped = parse_annotation(
        3, EXPORTED_TASK, {"id": 12, "completed_by": {"id": 2, "email": "b@x"}, "was_cancelled": True, "result": []}, {}
    )
    assert (skipped.annotator, skipped.verdict, skipped.cancelled) == ("b@x", None, True)


def test_version_hash_depends_only_on_content_and_name():
    records = [
        {
            "run_id": "A",
            "custom_id": "q0",
            "output_id": "o",
            "source": "accepted",
            "rating": None,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        }
    ]
    first = version_manifest("sft", records)
    assert first == version_manifest("sft", json.loads(json.dumps(records)))
    assert first["counts"] == {"examples": 1, "accepted": 1, "corrected": 0} and first["source_runs"] == ["A"]
    assert version_manifest("other", records)["curated_version"] != first["curated_version"]
    changed = [{**records[0], "messages": [records[0]["messages"][0], {"role": "assistant", "content": "yo!"}]}]
    assert version_manifest("sft", changed)["curated_version"] != first["curated_version"]


def test_only_transient_label_studio_errors_are_retried():
    assert retry_when_transient(None, None, Failed(data=LabelStudioError("503 from the server", transient=True)))
    assert not retry_when_transient(None, None, Failed(data=LabelStudioError("401: bad key", transient=False)))
    assert retry_when_transient(None, None, Failed(data=OSError("anything else keeps Prefect's policy")))
