"""The LLM judge: a second model grades each answer under a rubric (either engine)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import jinja2.sandbox
import pyarrow as pa

from tasks.config import ModelConfig, SamplingConfig
from tasks.engines import open_engine
from tasks.keys import content_hash, model_fingerprint, sampling_hash
from tasks.prepare.render import conversation
from tasks.scoring.scorers import Score, Scorer

DEFAULT_RUBRIC = (
    "Rate the answer to the question on a scale from 1 (useless) to 10 (excellent) for correctness, "
    "helpfulness and clarity.\n\nQuestion:\n{{ prompt }}\n\nAnswer:\n{{ response }}\n\n"
    "Reply with one line: Score: <1-10>"
)
JUDGE_SCORE = [
    re.compile(r"(?i)\b(?:score|rating)\s*(?:is|of)?\s*[:=]?\s*\**\s*(10|[1-9])(?:\s*/\s*10)?(?!\.?\d)"),
    re.compile(r"(?<![\d.])(10|[1-9])\s*/\s*10(?!\.?\d)"),
    re.compile(r"^\s*\**(10|[1-9])\**\s*\.?\s*$"),
]
UNPARSEABLE = "unparseable"


def parse_judge_score(answer: str | None) -> float | None:
    """The 1–10 score in a judge's answer, or None when the answer holds no clear score."""
    for pattern in JUDGE_SCORE:
        match = pattern.search(answer or "")
        if match:
            return float(match.group(1))
    return None


def user_prompt(row: dict) -> str:
    """The question the answer replies to: the last user turn (or the prompt)."""
    users = [m["content"] for m in conversation(row.get("prompt"), row.get("messages")) if m.get("role") == "user"]
    return users[-1] if users else ""


def judge_scorer(
    model: ModelConfig | dict,
    rubric: str = DEFAULT_RUBRIC,
    sampling: SamplingConfig | dict | None = None,
    name: str = "judge",
    secrets: Callable[[str | None], str | None] = lambda name: None,
) -> Scorer:
    """Ask a second model (either engine) to grade each answer; its rubric, model and sampling make up its version.

    `secrets` looks up the judge server's API key at run time (the scoring task passes the Secret blocks).
    """
    model = ModelConfig.model_validate(model)
    sampling = SamplingConfig.model_validate(sampling or {"max_tokens": 16})
    template = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined).from_string(rubric)
    version = "1+" + content_hash({"rubric": rubric, "model": model_fingerprint(model), "sampling": sampling_hash(sampling)})[:8]

    def score(rows: list[dict]) -> list[Score]:
        if not rows:
            return []
        prompts = [template.render(prompt=user_prompt(row), response=row["text"], reference=row.get("reference")) for row in rows]
        judge_requests = pa.table(
            {
                "request_key": [str(i) for i in range(len(rows))],
                "prompt": prompts,
                "messages": [json.dumps(conversation(p, None)) if model.mode == "chat" else None for p in prompts],
            }
        )
        engine = open_engine(model, secrets(model.api_key_secret))
        answers = engine.generate(judge_requests, sampling, key=f"judge-{version}").outputs
        by_index = {int(a["request_key"]): a for a in answers.to_pylist() if a["sample_index"] == 0}
        results: list[Score] = []
        for i in range(len(rows)):
            answer = by_index[i]
            if answer["error_code"] is not None:
                results.append((None, f"judge_error: {answer['error_code']}"))
                continue
            value = parse_judge_score(answer["text"])
            results.append((value, None) if value is not None else (None, UNPARSEABLE))
        return results

    return Scorer(name, version, score, "higher")
