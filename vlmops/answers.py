"""Comparing an answer with a reference answer: the exact match the evaluate step and batch jobs score."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Sentence-ending punctuation a model adds to a short answer ("Red." for "red"), ASCII and CJK.
TRAILING_PUNCTUATION = ".,!?;:。，！？；：…"
_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace runs made one space, outer whitespace and trailing punctuation removed."""
    text = _WHITESPACE.sub(" ", text.casefold()).strip()
    return text.rstrip(TRAILING_PUNCTUATION + " ")


def exact_match(prediction: str, reference: str) -> bool:
    """True when the two answers are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


@dataclass(frozen=True)
class Score:
    """Exact match over the answers that had a reference: how many were scored and how many matched."""

    scored: int = 0
    correct: int = 0

    def add(self, prediction: str, reference: str) -> Score:
        return Score(self.scored + 1, self.correct + exact_match(prediction, reference))

    @property
    def accuracy(self) -> float:
        return self.correct / self.scored if self.scored else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {"metric": "exact_match", "scored": self.scored, "correct": self.correct, "accuracy": self.accuracy}
