"""What stage 5 reads, as typed records (`Dataset`), the fatal problems it finds (`Problems`),
and the predicates its checks share. Read and checked by validate.py, propensity_checks.py;
summarized by diagnostics.py and stages/summarize.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .records import JudgeScore, OracleLabel, Prompt, Quarantined, Response, SelfCheck, TeacherForced

MAX_EXAMPLES = 5          # offending records shown per problem line


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fmt(x) -> str:
    return repr(x) if not is_num(x) else f"{x:.6g}"


@dataclass
class Dataset:
    """Every input, keyed; filled as far as the files allow (a broken file leaves its part empty)."""

    run: dict = field(default_factory=dict)
    prompts: list[Prompt] = field(default_factory=list)
    responses: dict[tuple[str, str], Response] = field(default_factory=dict)
    logprobs: dict[tuple[str, str], TeacherForced] = field(default_factory=dict)
    # The base policy's text events (base_text_logprobs.jsonl): the denominator of each weight of a
    # target with another tokenizer (its record's event is "text").
    base_text: dict[tuple[str, str], TeacherForced] = field(default_factory=dict)
    self_checks: dict[tuple[str, str], SelfCheck] = field(default_factory=dict)
    judge: dict[tuple[str, str], JudgeScore] = field(default_factory=dict)
    oracle: dict[tuple[str, str], OracleLabel] = field(default_factory=dict)
    lines: dict[tuple[str, str, str], int] = field(default_factory=dict)   # (file, pid, pol) -> line
    # Prompts left out of the dataset (prompt_id -> the quarantined units and why); `prompts` and
    # every record above hold only the others.
    excluded: dict[str, list[Quarantined]] = field(default_factory=dict)
    all_prompt_ids: list[str] = field(default_factory=list)
    left_out: list[Prompt] = field(default_factory=list)     # the excluded prompts' records

    def teacher_forced(self, policy: str) -> np.ndarray:
        """The base responses' teacher-forced log-probabilities under `policy`, in prompt order."""
        return np.array([self.logprobs[(p.prompt_id, policy)].logprob for p in self.prompts], dtype=float)

    def denominator(self, prompt_id: str, target: str, base: str) -> TeacherForced:
        """The base policy's record of the event that `target`'s record scores: its text event
        for a target with another tokenizer, its sampled tokens otherwise."""
        if self.logprobs[(prompt_id, target)].event == "text":
            return self.base_text[(prompt_id, base)]
        return self.logprobs[(prompt_id, base)]

    def log_weight(self, prompt_id: str, target: str, base: str) -> float:
        return self.logprobs[(prompt_id, target)].logprob - self.denominator(prompt_id, target, base).logprob

    def log_weights(self, target: str, base: str) -> np.ndarray:
        """Each base response's log importance weight for `target`, in prompt order."""
        return np.array([self.log_weight(p.prompt_id, target, base) for p in self.prompts], dtype=float)

    def exported_logprob(self, prompt_id: str, target: str, base: str) -> float:
        """`target`'s log-probability as the CJE files give it beside the base's token-sequence
        one: chosen so that target minus base is the target's own weight, whichever event it scores
        (for a text event that is not the target's probability of the token sequence)."""
        return self.logprobs[(prompt_id, base)].logprob + self.log_weight(prompt_id, target, base)


class Problems:
    """Fatal problems, one line each: a rule, a count and the first few offending records."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, msg: str) -> None:
        self.lines.append(msg)

    def rule(self, file: str, what: str, items: list[str]) -> None:
        if items:
            shown = "; ".join(items[:MAX_EXAMPLES])
            more = f"; and {len(items) - MAX_EXAMPLES} more" if len(items) > MAX_EXAMPLES else ""
            self.add(f"{file}: {len(items)} {what}: {shown}{more}")


def legal_values(values) -> bool:
    return isinstance(values, list) and all(is_num(v) and math.isfinite(v) and v <= 0 for v in values)


def token_logprobs_match(values, n_tokens, total) -> bool:
    """values is one finite log-probability <= 0 per token, and they sum to total (a total that
    is itself no log-probability is reported by its own rule, not here)."""
    if not lp_ok(total):
        return True
    return (legal_values(values) and isinstance(n_tokens, int) and len(values) == n_tokens
            and is_num(total) and abs(math.fsum(values) - total) <= 1e-9 * max(1.0, abs(total)))


def in_unit(x, hi: float = 1.0) -> bool:
    return is_num(x) and math.isfinite(x) and 0.0 <= x <= hi


def lp_ok(x) -> bool:
    return is_num(x) and math.isfinite(x) and x <= 0


def shape_ok(r, logprob_attr: str) -> bool:
    if getattr(r, "event", "tokens") == "text":
        return lp_ok(r.logprob) and text_record_ok(r)
    return lp_ok(getattr(r, logprob_attr)) and token_logprobs_match(
        r.token_logprobs, r.n_tokens, getattr(r, logprob_attr))


def text_record_ok(r) -> bool:
    """A text-event record's figures agree: `logprob` is the log-sum-exp of its paths' values
    (and of the crossing mass), each value a log-probability, the best path's per-token values
    sum to its value (a path that ends before the text's end adds its crossing tokens' term)."""
    paths, values, crossing = r.paths, r.path_logprobs, r.crossing_logprob
    if not (isinstance(paths, list) and paths and isinstance(values, list) and len(values) == len(paths)
            and all(isinstance(p, list) for p in paths) and all(lp_ok(v) for v in values)
            and (crossing is None or lp_ok(crossing)) and is_num(r.dropped_bound) and 0 <= r.dropped_bound <= 1):
        return False
    terms = values + ([crossing] if crossing is not None else [])
    total = float(np.logaddexp.reduce(np.array(terms, dtype=float)))
    best = math.fsum(r.token_logprobs) if legal_values(r.token_logprobs) else math.inf
    return (abs(total - r.logprob) <= 1e-9 * max(1.0, abs(total)) and max(values) == values[0]
            and isinstance(r.n_tokens, int) and len(r.token_logprobs) == r.n_tokens
            and best >= values[0] - 1e-9 * max(1.0, abs(best)))
