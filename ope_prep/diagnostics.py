"""Figures that say whether scores carry signal, and what the prompts left out have in common:
computed once, used by stage 5's report and summary and by the judge study (scripts/judge_study.py)."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats


@dataclass
class Spread:
    n: int
    std: float
    n_distinct: int        # distinct values (a judge answering "1" every time has 1)
    lo: float
    hi: float


def spread(values: Sequence[float]) -> Spread:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return Spread(0, math.nan, 0, math.nan, math.nan)
    return Spread(int(v.size), float(v.std(ddof=1)) if v.size > 1 else 0.0,
                  int(np.unique(v).size), float(v.min()), float(v.max()))


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (ties get average ranks); None when it is undefined
    (fewer than 3 pairs, or either side constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def spearman_undefined(x: Sequence[float], y: Sequence[float], names: tuple[str, str] = ("x", "y")) -> Optional[str]:
    """Why spearman(x, y) is None, in words for a report; None when it is defined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3:
        return f"too few pairs ({x.size}; needs 3)"
    constant = [f"every {name} is {v[0]:.3g}" for name, v in zip(names, (x, y)) if np.unique(v).size < 2]
    return "; ".join(constant) or None


@dataclass
class Gap:
    n: int                 # prompts with a score under both policies
    gap: float             # mean(base) - mean(target)
    se: float              # standard error of the paired mean difference
    z: Optional[float]     # gap / se (None when se is 0 or n < 2)


def paired_gap(base: Mapping[str, float], target: Mapping[str, float]) -> Gap:
    """How far the base policy's mean score is above the target's, paired by prompt, in
    standard errors of the mean difference."""
    common = [k for k in base if k in target]
    d = np.array([base[k] - target[k] for k in common], dtype=float)
    if d.size == 0:
        return Gap(0, math.nan, math.nan, None)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    z = float(d.mean() / se) if d.size > 1 and se > 0 else None
    return Gap(int(d.size), float(d.mean()), se, z)


def exclusion_profile(included: Sequence, left_out: Sequence, reasons: Mapping[str, Sequence]) -> dict:
    """What the prompts left out (quarantined) have in common, against the ones kept: how many
    per stage and reason (numbers in the reason folded, so "1,204 tokens" and "1,311 tokens" are
    one reason), per source, and their length in characters. A left-out set that is all long, or
    all from one source, biases the estimate toward what remains; this says so.
    included, left_out: Prompt records; reasons: prompt_id -> its Quarantined units."""
    why = Counter(f"{qs[0].stage}: {re.sub(r'[0-9][0-9.,]*', 'N', qs[0].error)[:140]}" for qs in reasons.values())
    sources = sorted({p.source for p in [*included, *left_out]})

    def chars(prompts) -> Optional[dict]:
        n = [len(p.prompt) for p in prompts]
        return {"median": float(np.median(n)), "max": max(n)} if n else None

    return {"n": len(left_out), "of": len(left_out) + len(included),
            "by_reason": dict(why.most_common()),
            "by_source": {s: {"left_out": sum(p.source == s for p in left_out),
                              "kept": sum(p.source == s for p in included)} for s in sources},
            "prompt_chars": {"left_out": chars(left_out), "kept": chars(included)}}
