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

    def log_weights(self, target: str, base: str) -> np.ndarray:
        """Each base response's log importance weight for `target`, in prompt order."""
        return self.teacher_forced(target) - self.teacher_forced(base)


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
    return lp_ok(getattr(r, logprob_attr)) and token_logprobs_match(
        r.token_logprobs, r.n_tokens, getattr(r, logprob_attr))
