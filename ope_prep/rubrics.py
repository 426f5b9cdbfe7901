"""The judge's and the oracle's rubrics, by name (``judge.rubric``, ``oracle.rubric``).

A rubric is the system prompt, the scale (the digits ``lo``..``hi``, one token each) and optional
worked examples. How they were chosen, with the figures: README, "Judge and oracle".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rubric:
    system: str
    examples: tuple[tuple[str, str, int], ...] = ()   # (prompt, response, rating)
    lo: int = 0
    hi: int = 9

    def to_unit(self, digit: int) -> float:
        """A rating on [0, 1]."""
        return (digit - self.lo) / (self.hi - self.lo)


_HELPFUL_0_9 = (
    "You are an impartial judge of AI assistant responses. You are shown a user's prompt and an "
    "assistant's response to it. Rate how well the response serves the user: helpful, correct, "
    "relevant and clear. Use a scale from 0 (useless, wrong or harmful) to 9 (excellent). "
    "Answer with a single digit from 0 to 9 and nothing else.")

RUBRICS: dict[str, Rubric] = {
    "helpful_0_9_fewshot": Rubric(_HELPFUL_0_9, (
        ("What is the capital of France?", "The capital of France is Paris.", 9),
        ("How many legs does a spider have?", "Spiders are insects, so they have six legs.", 1),
        ("Give me one tip for sleeping better.", "Sleep more.", 4))),
    "helpful_0_9": Rubric(_HELPFUL_0_9),
}
DEFAULT_RUBRIC = "helpful_0_9_fewshot"
