"""LLM judges: a second model grades answers, one at a time under a rubric (absolute: a score from 1
to 10), or two side by side (pairwise: A, B or tie; `tasks/scoring/judgement.py` shows each pair in
both orders). The verdict is constrained with vLLM's structured output, so every answer the judge
gives is a verdict: a choice among the labels, or a JSON object with the verdict and a reason.

The `judge` scorer (compare, rescore) is the absolute judge over a table of outputs; the
`judge_runs` flow runs either judge over stored runs through the inference path, cached like it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Literal

import jinja2
import jinja2.sandbox
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.config import TINY_CPU_MODEL, ModelConfig, SamplingConfig, SpecError, StructuredOutput
from tasks.engines import open_engine
from tasks.keys import content_hash, model_fingerprint, sampling_hash
from tasks.prepare.render import conversation
from tasks.scoring.scorers import Score, Scorer

JudgeKind = Literal["absolute", "pairwise"]
VerdictFormat = Literal["choice", "json"]

ABSOLUTE_RUBRIC = (
    "Rate the answer to the question on a scale from 1 (useless) to 10 (excellent) for correctness, "
    "helpfulness and clarity.\n\nQuestion:\n{{ prompt }}\n\nAnswer:\n{{ response }}\n\n{{ reply_format }}"
)
PAIRWISE_RUBRIC = (
    "Which answer to the question is better: more correct, helpful and clear?\n\nQuestion:\n{{ prompt }}\n\n"
    "Answer A:\n{{ answer_a }}\n\nAnswer B:\n{{ answer_b }}\n\n{{ reply_format }}"
)
RUBRICS: dict[str, str] = {"absolute": ABSOLUTE_RUBRIC, "pairwise": PAIRWISE_RUBRIC}
# What each judge may answer, and the JSON key that holds it.
LABELS: dict[str, list[str]] = {"absolute": [str(score) for score in range(1, 11)], "pairwise": ["A", "B", "tie"]}
VERDICT_KEY = {"absolute": "score", "pairwise": "verdict"}
REPLY_FORMATS = {
    ("absolute", "choice"): "Reply with the score alone: a number from 1 to 10.",
    ("absolute", "json"): 'Reply with JSON: {"score": <1-10>, "reason": "<one sentence>"}',
    ("pairwise", "choice"): "Reply with A, B or tie.",
    ("pairwise", "json"): 'Reply with JSON: {"verdict": "A" or "B" or "tie", "reason": "<one sentence>"}',
}
REASON_CHARS = 200
# Fewest tokens that always hold a whole verdict: the longest label (choice), or the JSON up to and
# including the verdict (json; a reason cut short by max_tokens still leaves the verdict whole). A
# token is at least one character of this ASCII text, so these hold for any tokenizer.
MIN_MAX_TOKENS = {"choice": 4, "json": 24}
DEFAULT_MAX_TOKENS = {"choice": 8, "json": 64}
UNPARSEABLE = "unparseable"
# The judge's code version, the first part of its version: bump it when what the rubric hash does not
# cover changes a verdict — the reply formats, the constraint, how an answer is read as a verdict.
JUDGE_VERSION = "2"
# A JSON verdict whose reason max_tokens cut short: the verdict, whole (a closing quote or comma after
# it), and what there is of the reason.
VERDICT_PREFIX = {
    "pairwise": re.compile(r'\{\s*"verdict"\s*:\s*"(tie|A|B)"\s*(?:,\s*"reason"\s*:\s*"(.*))?', re.S),
    "absolute": re.compile(r'\{\s*"score"\s*:\s*"?(10|[1-9])"?\s*,\s*(?:"reason"\s*:\s*"(.*))?', re.S),
}


def verdict_constraint(kind: JudgeKind, verdict: VerdictFormat) -> StructuredOutput:
    """The structured output every verdict is held to.

    JSON is constrained with a regex, not a JSON schema: a schema lets the model put any whitespace
    between the keys, so a verdict could be pushed past max_tokens; the regex fixes the layout and
    bounds the reason, so the verdict always comes within the first MIN_MAX_TOKENS tokens."""
    labels = LABELS[kind]
    if verdict == "choice":
        return StructuredOutput(choice=labels)
    alternatives = "|".join(f'"{label}"' if kind == "pairwise" else label for label in sorted(labels, key=len, reverse=True))
    reason = '[^"\\\\\\x00-\\x1f]{0,' + str(REASON_CHARS) + "}"
    return StructuredOutput(regex=f'\\{{"{VERDICT_KEY[kind]}": ({alternatives}), "reason": "{reason}"\\}}')


def parse_verdict(text: str | None, kind: JudgeKind, verdict: VerdictFormat) -> tuple[str, str | None] | None:
    """(label, reason) of a judge's answer, or None when it holds no verdict (an answer from a server
    that ignored the constraint). A JSON answer cut short in its reason keeps its verdict."""
    labels = LABELS[kind]
    text = (text or "").strip()
    if verdict == "choice":
        return (text, None) if text in labels else None
    try:
        found = json.loads(text, strict=False)
        label, reason = str(found[VERDICT_KEY[kind]]), found.get("reason")
        return (label, reason if isinstance(reason, str) else None) if label in labels else None
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    prefix = VERDICT_PREFIX[kind].match(text)
    return (prefix.group(1), prefix.group(2)) if prefix else None


class JudgeConfig(BaseModel):
    """The judge: its model, which judge (absolute or pairwise), the verdict's form, its rubric and sampling."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelConfig | str = Field(
        TINY_CPU_MODEL,
        description="The judge model, on either engine (a served one: engine openai), or the name of a saved Inference "
        "Model block (judge_runs loads it, as batch_inference loads its model's).",
    )
    kind: JudgeKind = Field(
        "pairwise",
        description="pairwise: two answers side by side, shown in both orders (A, B or tie); absolute: each answer alone, 1-10.",
    )
    verdict: VerdictFormat = Field(
        "choice", description="choice: the label alone; json: a JSON object with the verdict and a one-sentence reason."
    )
    rubric: str | None = Field(
        None,
        description="Jinja template of the judge's prompt over prompt, reference and reply_format, and answer_a and "
        "answer_b (pairwise) or response (absolute). Default: RUBRICS[kind].",
    )
    sampling: SamplingConfig | None = Field(
        None, description="Default: greedy, max_tokens 8 (choice) or 64 (json). Its structured output is the judge's own."
    )

    @model_validator(mode="after")
    def _verdict_always_fits(self) -> JudgeConfig:
        if self.sampling is not None:
            if self.sampling.structured is not None:
                raise ValueError("sampling.structured: the judge constrains its verdict itself; leave it unset")
            if self.sampling.n != 1:
                raise ValueError(f"sampling.n: a judge gives one verdict per request, got n = {self.sampling.n}")
            if self.sampling.max_tokens < MIN_MAX_TOKENS[self.verdict]:
                raise ValueError(
                    f"sampling.max_tokens: a {self.verdict} verdict needs at least {MIN_MAX_TOKENS[self.verdict]}, "
                    f"got {self.sampling.max_tokens}"
                )
        try:
            self.prompt("question", "first answer", "second answer", "reference")
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"rubric: not a valid Jinja template (line {error.lineno}: {error.message})") from error
        except jinja2.UndefinedError as error:
            answers = "response" if self.kind == "absolute" else "answer_a, answer_b"
            raise ValueError(f"rubric: {error.message}; it may use prompt, reference, reply_format and {answers}") from error
        return self

    def template(self) -> jinja2.Template:
        environment = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)
        return environment.from_string(self.rubric or RUBRICS[self.kind])

    def judge_sampling(self) -> SamplingConfig:
        """The sampling the judge runs with: its verdict constrained."""
        sampling = self.sampling or SamplingConfig(max_tokens=DEFAULT_MAX_TOKENS[self.verdict])
        return sampling.model_copy(update={"structured": verdict_constraint(self.kind, self.verdict)})

    def rubric_hash(self) -> str:
        return content_hash({"rubric": self.rubric or RUBRICS[self.kind], "kind": self.kind, "verdict": self.verdict})

    def prompt(self, question: str, first: str, second: str | None = None, reference: str | None = None) -> str:
        """The judge's prompt: an answer (absolute), or two, `first` shown as A (pairwise)."""
        answers = {"response": first} if self.kind == "absolute" else {"answer_a": first, "answer_b": second}
        reply_format = REPLY_FORMATS[(self.kind, self.verdict)]
        return self.template().render(prompt=question, reference=reference, reply_format=reply_format, **answers)


def user_prompt(row: dict) -> str:
    """The question the answer replies to: the last user turn (or the prompt)."""
    users = [m["content"] for m in conversation(row.get("prompt"), row.get("messages")) if m.get("role") == "user"]
    return users[-1] if users else ""


def judge_scorer(
    model: ModelConfig | dict,
    rubric: str | None = None,
    sampling: SamplingConfig | dict | None = None,
    name: str = "judge",
    verdict: VerdictFormat = "choice",
    secrets: Callable[[str | None], str | None] = lambda name: None,
) -> Scorer:
    """The absolute judge as a scorer: a second model (either engine) grades each answer 1-10. Its rubric,
    model, sampling and verdict form make up its version; a json verdict's reason is the score's label.

    `secrets` looks up the judge server's API key at run time (the scoring task passes the Secret blocks).
    """
    if isinstance(model, str):  # a scorer's options are checked before any block could be loaded
        raise SpecError(f"model {model!r}: the judge scorer takes a model's configuration, not a saved block's name")
    judge = JudgeConfig(model=model, kind="absolute", verdict=verdict, rubric=rubric, sampling=sampling)
    judge_sampling = judge.judge_sampling()
    version = judge_version(judge, model_fingerprint(judge.model))

    def score(rows: list[dict]) -> list[Score]:
        if not rows:
            return []
        prompts = [judge.prompt(user_prompt(row), row["text"], reference=row.get("reference")) for row in rows]
        judge_requests = pa.table(
            {
                "request_key": [str(i) for i in range(len(rows))],
                "prompt": prompts,
                "messages": [json.dumps(conversation(p, None)) if judge.model.mode == "chat" else None for p in prompts],
            }
        )
        engine = open_engine(judge.model, secrets(judge.model.api_key_secret))
        answers = engine.generate(judge_requests, judge_sampling, key=f"judge-{version}").outputs
        by_index = {int(a["request_key"]): a for a in answers.to_pylist() if a["sample_index"] == 0}
        return [judge_score(by_index[i], judge.verdict) for i in range(len(rows))]

    return Scorer(name, version, score, "higher")


def judge_version(judge: JudgeConfig, fingerprint: str) -> str:
    """The judge's version, as the scorers' versions go: its code (JUDGE_VERSION), then a hash of its rubric,
    model and sampling. The `judge` scorer and an absolute `judge_runs` of the same judge write their scores
    under the same version; every judgement records its judge's."""
    sampling = sampling_hash(judge.judge_sampling())
    return f"{JUDGE_VERSION}+" + content_hash({"rubric": judge.rubric_hash(), "model": fingerprint, "sampling": sampling})[:8]


def judge_score(answer: dict, verdict: VerdictFormat) -> Score:
    """An absolute judge's answer as a score: (1-10, its reason), or no value and why."""
    if answer["error_code"] is not None:
        return None, judge_error(answer["error_code"])
    parsed = parse_verdict(answer["text"], "absolute", verdict)
    return (float(parsed[0]), parsed[1]) if parsed else (None, UNPARSEABLE)


def judge_error(code: str) -> str:
    """A score's label when the judge gave no verdict: its answer did not parse, or its request failed."""
    return code if code == UNPARSEABLE else f"judge_error: {code}"
