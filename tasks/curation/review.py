"""Review: what a reviewer sees in Label Studio (the labeling config, the task), and what comes back."""

from __future__ import annotations

import json
from xml.sax.saxutils import escape

from tasks.prepare.render import conversation
from tasks.store.rows import AnnotationRow, LabelTaskRow

# Scorers whose positive value suggests rejecting the answer (blank, or cut off by max_tokens).
REJECT_SIGNALS = ("empty_output", "finish_reason")


def labeling_config(title: str) -> str:
    """Prompt and response side by side; accept/reject, a 1–5 rating, an optional corrected response."""
    return f"""<View>
  <Header value="{escape(title, {'"': "&quot;"})}"/>
  <Header value="Prompt" size="5"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Response" size="5"/>
  <Text name="response" value="$response"/>
  <Text name="scores" value="$scores"/>
  <Choices name="verdict" toName="response" choice="single" required="true" showInline="true">
    <Choice value="accept"/>
    <Choice value="reject"/>
  </Choices>
  <Rating name="rating" toName="response" maxRating="5"/>
  <TextArea name="corrected" toName="response" placeholder="Corrected response (optional)" rows="4"
            editable="true" maxSubmissions="1"/>
</View>"""


def display_prompt(prompt: str | None, messages: str | None) -> str:
    """What the model saw: the chat messages one per paragraph, or the plain prompt."""
    if not messages:
        return prompt or ""
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in conversation(prompt, messages))


def suggested_verdict(scores: dict[str, float]) -> str:
    return "reject" if any((scores.get(name) or 0) > 0 for name in REJECT_SIGNALS) else "accept"


def task_payload(sample: dict, scorer: str) -> dict:
    """A Label Studio task: the sample's keys and text as data, our scores as a pre-filled prediction."""
    scores = json.loads(sample["scores"] or "{}")
    return {
        "data": {
            "run_id": sample["run_id"],
            "custom_id": sample["custom_id"],
            "output_id": sample["output_id"],
            "prompt": display_prompt(sample["prompt"], sample["messages"]),
            "response": sample["response"] or "",
            "scores": " · ".join(f"{name} = {value:g}" for name, value in sorted(scores.items()) if value is not None),
        },
        "predictions": [
            {
                "model_version": "vllm-batch-flows scores",
                "score": scores.get(scorer),
                "result": [
                    {
                        "from_name": "verdict",
                        "to_name": "response",
                        "type": "choices",
                        "value": {"choices": [suggested_verdict(scores)]},
                    }
                ],
            }
        ],
    }


def task_key(data: dict) -> tuple[str, str] | None:
    """(run_id, custom_id) of a task this project pushed; None for tasks added by other means."""
    if "run_id" in data and "custom_id" in data:
        return str(data["run_id"]), str(data["custom_id"])
    return None


def parse_annotation(project_id: int, task: dict, annotation: dict, emails: dict[int, str]) -> AnnotationRow:
    """One `annotations` row from a Label Studio annotation of one of our tasks."""
    fields: dict = {"verdict": None, "rating": None, "corrected_text": None}
    for item in annotation.get("result") or []:
        value = item.get("value") or {}
        if item.get("from_name") == "verdict" and value.get("choices"):
            fields["verdict"] = value["choices"][0]
        elif item.get("from_name") == "rating" and value.get("rating") is not None:
            fields["rating"] = int(value["rating"])
        elif item.get("from_name") == "corrected" and value.get("text"):
            fields["corrected_text"] = "\n".join(value["text"]).strip() or None
    completed_by = annotation.get("completed_by")
    if isinstance(completed_by, dict):
        annotator = completed_by.get("email") or str(completed_by.get("id"))
    else:
        annotator = emails.get(completed_by, str(completed_by))
    return AnnotationRow(
        annotation_id=annotation["id"],
        task_id=task["id"],
        project_id=project_id,
        run_id=str(task["data"]["run_id"]),
        custom_id=str(task["data"]["custom_id"]),
        output_id=task["data"].get("output_id"),
        annotator=annotator,
        **fields,
        cancelled=bool(annotation.get("was_cancelled")),
        created_at=annotation.get("created_at"),
        updated_at=annotation.get("updated_at") or annotation.get("created_at"),
    )


def label_task_rows(
    samples: list[dict], task_ids: dict, server_url: str, project_id: int, title: str, strategy: str
) -> list[LabelTaskRow]:
    """The `label_tasks` rows of the samples that got a task."""
    return [
        LabelTaskRow(
            server_url=server_url,
            project_id=project_id,
            project_title=title,
            run_id=s["run_id"],
            custom_id=s["custom_id"],
            output_id=s["output_id"],
            task_id=task_ids[(s["run_id"], s["custom_id"])],
            strategy=strategy,
        )
        for s in samples
        if (s["run_id"], s["custom_id"]) in task_ids
    ]
