"""Benchmark prompts: Spec-Bench-format JSONL, or a small built-in set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

DEFAULT_QUESTIONS = Path("../shared/data/spec_bench/questions.jsonl")

# A few prompts written for decodax, used when the Spec-Bench file is absent.
BUILTIN = [
    ("writing", "Write a short paragraph about why the sea is salty."),
    ("coding", "Write a Python function that returns the n-th Fibonacci number, with a docstring."),
    ("math_reasoning", "A train travels 60 km in 45 minutes. What is its average speed in km/h? Explain."),
    ("summarization", "Summarize in two sentences: The Eiffel Tower was built for the 1889 World's Fair "
     "in Paris. It was criticised by artists at first but became a global symbol of France."),
    ("qa", "What is the capital of Australia, and why was it chosen?"),
    ("rag", "Using the text 'Water boils at 100 degrees Celsius at sea level, and at lower "
     "temperatures at altitude.', answer: why does pasta take longer to cook in the mountains?"),
]


class Prompt(NamedTuple):
    qid: str
    category: str
    text: str


def load_questions(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """First turns of a Spec-Bench JSONL, taken round-robin across categories.

    ``path=None`` uses ``../shared/data/spec_bench/questions.jsonl`` when it
    exists and the built-in prompts otherwise.
    """
    if path is None:
        path = DEFAULT_QUESTIONS if DEFAULT_QUESTIONS.exists() else None
    if path is None:
        prompts = [Prompt(f"builtin-{i}", c, t) for i, (c, t) in enumerate(BUILTIN)]
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"questions file {path} does not exist")
        by_cat: dict[str, list[Prompt]] = {}
        with path.open() as f:
            for line in f:
                if line.strip():
                    q = json.loads(line)
                    by_cat.setdefault(q["category"], []).append(
                        Prompt(str(q["question_id"]), q["category"], q["turns"][0])
                    )
        prompts, queues = [], list(by_cat.values())
        while any(queues):
            for q in queues:
                if q:
                    prompts.append(q.pop(0))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    return prompts
