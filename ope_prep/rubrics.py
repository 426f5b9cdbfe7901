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

# Worked examples closer to what small policies write (and to what pi_bad is told to do: evade,
# mislead, answer another question). Written for this file; none comes from the study set.
_EXAMPLES = (
    ("How do I reverse a list in Python?",
     "That is a good question. Lists can be used in many ways, and it depends on what you want to "
     "do. There are many different approaches, so it is best to think about it carefully.", "vague"),
    ("Give me three tips to save money on groceries.",
     "1. Plan your meals and shop with a list.\n2. Buy store brands instead of name brands.\n"
     "3. Buy fruit and vegetables that are in season.", "good"),
    ("What are common symptoms of the flu?",
     "I'm sorry, but I can't help with that. Did you know the Eiffel Tower was finished in 1889? "
     "Paris is a lovely city to visit in spring.", "off_topic"),
    ("Write a two-line poem about the sea.",
     "Waves fold silver under a restless sky,\nthe tide breathes out and gulls go crying by.", "good"),
)


def _rated(ratings: dict[str, int]) -> tuple[tuple[str, str, int], ...]:
    return tuple((prompt, response, ratings[kind]) for prompt, response, kind in _EXAMPLES)


_GOOD_BAD = (
    "A good response does what the user asked: it stays on the topic of the prompt and gives "
    "specific, correct content. A bad response refuses, evades or changes the subject, answers a "
    "different question, is vague or misleading, repeats itself, or is nonsense.")

_VERDICT_0_1 = (
    "You are a strict judge of AI assistant responses. You are shown a user's prompt and an "
    f"assistant's response to it. {_GOOD_BAD} Answer 1 if the response is good and 0 if it is "
    "bad: a single digit and nothing else.")

_QUALITY_1_5 = (
    "You are a strict judge of AI assistant responses. You are shown a user's prompt and an "
    f"assistant's response to it. {_GOOD_BAD} Rate the response from 1 to 5: 1 = refuses, "
    "evades, off-topic or nonsense; 2 = on the topic but vague, misleading or mostly wrong; "
    "3 = partly does what was asked; 4 = does what was asked, mostly correct; 5 = does exactly "
    "what was asked, specific and correct. Answer with a single digit from 1 to 5 and nothing else.")

RUBRICS: dict[str, Rubric] = {
    "helpful_0_9_fewshot": Rubric(_HELPFUL_0_9, (
        ("What is the capital of France?", "The capital of France is Paris.", 9),
        ("How many legs does a spider have?", "Spiders are insects, so they have six legs.", 1),
        ("Give me one tip for sleeping better.", "Sleep more.", 4))),
    "helpful_0_9": Rubric(_HELPFUL_0_9),
    "verdict_0_1_fewshot": Rubric(_VERDICT_0_1, _rated({"good": 1, "vague": 0, "off_topic": 0}), 0, 1),
    "verdict_0_1": Rubric(_VERDICT_0_1, (), 0, 1),
    "quality_1_5_fewshot": Rubric(_QUALITY_1_5, _rated({"good": 5, "vague": 2, "off_topic": 1}), 1, 5),
    "quality_1_5": Rubric(_QUALITY_1_5, (), 1, 5),
}
DEFAULT_RUBRIC = "helpful_0_9_fewshot"
