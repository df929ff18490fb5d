"""Regenerate datasets/sample/prompts.parquet (deterministic: the same file every time).

2,400 instruction prompts built from templates over topics, with planted exact duplicates,
near-duplicates (case, spacing, punctuation) and a few null or empty prompts, so every stage of
the pipeline has something to do.

    python datasets/sample/make_sample.py
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).with_name("prompts.parquet")

TOPICS = [
    "photosynthesis",
    "the French Revolution",
    "black holes",
    "compound interest",
    "the TCP handshake",
    "sourdough bread",
    "climate change",
    "the immune system",
    "blockchain",
    "the Roman Empire",
    "machine learning",
    "volcanoes",
    "jazz music",
    "the water cycle",
    "quantum computing",
    "supply and demand",
    "the human heart",
    "electric cars",
    "coral reefs",
    "the printing press",
    "vaccines",
    "the stock market",
    "plate tectonics",
    "renewable energy",
    "the Silk Road",
    "sleep",
    "honeybees",
    "the Internet",
    "democracy",
    "antibiotics",
]
AUDIENCES = ["a ten-year-old", "a new employee", "a university student", "my grandmother", "a software engineer"]
TEMPLATES = {
    "explain": [
        "Explain {topic} to {audience} in simple terms.",
        "Give a short explanation of {topic} for {audience}.",
        "What is the most important thing {audience} should know about {topic}?",
    ],
    "summarize": [
        "Summarize the history of {topic} in three sentences.",
        "Write a one-paragraph summary of {topic}.",
    ],
    "write": [
        "Write a haiku about {topic}.",
        "Write a short story for {audience} that involves {topic}.",
        "Write a limerick about {topic}.",
        "Draft a friendly email inviting {audience} to a talk about {topic}.",
    ],
    "list": [
        "List five surprising facts about {topic}.",
        "Give three common misconceptions about {topic} and correct them.",
        "List the pros and cons of teaching {topic} in schools.",
    ],
    "question": [
        "Write four quiz questions about {topic} with answers.",
        "What are good follow-up questions to ask an expert on {topic}?",
    ],
    "classify": [
        "Classify this statement as true or false and explain: '{topic} was discovered in the 20th century.'",
    ],
}


STYLES = ["", " Keep it under 100 words.", " Use an analogy.", " Answer in a formal tone."]


def near_duplicate(prompt: str, rng: random.Random) -> str:
    """A variant that differs only in case, spacing or trailing punctuation."""
    variants = [
        prompt.lower(),
        prompt.replace(" ", "  ", 1),
        prompt.rstrip(".?!") + "!",
        "  " + prompt,
        prompt.upper(),
    ]
    return rng.choice(variants)


def make_rows(n_rows: int = 2400, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    base = [
        (category, template.format(topic=topic, audience=audience) + style)
        for category, templates in TEMPLATES.items()
        for template in templates
        for topic in TOPICS
        for audience in AUDIENCES
        for style in STYLES
    ]
    base = list(dict.fromkeys(base))  # templates without {audience} repeat: keep one of each
    rng.shuffle(base)

    rows: list[dict] = []
    for category, prompt in base:
        if len(rows) >= n_rows:
            break
        roll = rng.random()
        if rows and roll < 0.06:  # exact duplicate of an earlier prompt
            earlier = rng.choice(rows)
            rows.append({"category": earlier["category"], "prompt": earlier["prompt"]})
        elif rows and roll < 0.10:  # near-duplicate of an earlier prompt
            earlier = rng.choice([r for r in rows[-200:] if r["prompt"]])
            rows.append({"category": earlier["category"], "prompt": near_duplicate(earlier["prompt"], rng)})
        rows.append({"category": category, "prompt": prompt})
    rows = rows[:n_rows]
    for index in rng.sample(range(len(rows)), 6):  # what real exports contain
        rows[index]["prompt"] = None if index % 2 else "   "
    for position, row in enumerate(rows):
        row["id"] = f"sample-{position:05d}"
    return rows


def main() -> None:
    rows = make_rows()
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "category": [r["category"] for r in rows],
            "prompt": pa.array([r["prompt"] for r in rows], type=pa.string()),
        }
    )
    pq.write_table(table, OUT, compression="zstd")
    print(f"wrote {table.num_rows} rows to {OUT}")


if __name__ == "__main__":
    main()
