"""Figures that say whether scores carry signal, how far the targets' weights reach, and what the
prompts left out have in common: computed once, used by stage 5's report and summary, stage 2b's
overlap check and the judge study (scripts/judge_study.py)."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from .config import Config
from .dataset import Dataset

QUANTILES = (0.5, 0.9, 0.99)


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


# ---- importance weights --------------------------------------------------------------------------

def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def _quantiles(x: np.ndarray) -> dict:
    q = np.quantile(x, QUANTILES)
    return {"min": float(np.min(x)), "mean": float(np.mean(x)),
            **{f"q{round(p * 100)}": float(v) for p, v in zip(QUANTILES, q)}, "max": float(np.max(x))}


def weight_diagnostics(log_w: np.ndarray, judge_base: np.ndarray | None = None) -> dict:
    """Raw importance-weight diagnostics from log-weights, computed in log space."""
    n = len(log_w)
    lse = _logsumexp(log_w)
    ess = math.exp(2 * lse - _logsumexp(2 * log_w))
    out = {"n": n, "ess": ess, "ess_fraction": ess / n,
           "max_weight_share": math.exp(float(np.max(log_w)) - lse),
           "log_weight": _quantiles(log_w)}
    if judge_base is not None:
        # Self-normalised IPS of the target's mean judge score from the logged base responses.
        out["snips_judge_estimate"] = float(np.sum(np.exp(log_w - lse) * judge_base))
    return out


def target_typicality_coverage(target_lp: np.ndarray, base_lp: np.ndarray, n_tokens: np.ndarray,
                               mass: float = 0.9) -> float:
    """Target-typicality coverage: the share of the logged (base) responses that look typical to
    the target, where "typical" is the per-token surprisal band that holds `mass` of the target's
    own probability. The target's mass is estimated from the logged responses themselves, by
    self-normalised importance weights; so a target whose mass sits on a few logged responses has
    a narrow band and low coverage, which a weight tail alone can miss. Below about 0.7 the
    logged data barely reach where the target puts its mass (CJE's gate); below 0.3 they do not.
    target_lp, base_lp: each logged response's total log-probability under target and base;
    n_tokens: its length in the target's tokens."""
    surprisal = -np.asarray(target_lp, float) / np.maximum(np.asarray(n_tokens, float), 1.0)
    log_w = np.asarray(target_lp, float) - np.asarray(base_lp, float)
    w = np.exp(log_w - _logsumexp(log_w))
    order = np.argsort(surprisal, kind="stable")
    reached = np.searchsorted(np.cumsum(w[order]), mass)     # as cje-eval's compute_ttc
    threshold = surprisal[order][min(int(reached), len(order) - 1)]
    return float(np.mean(surprisal <= threshold))


def overlap(target_lp: np.ndarray, base_lp: np.ndarray, n_tokens: np.ndarray,
            judge_base: np.ndarray | None = None) -> dict:
    """How well the logged (base) responses cover a target: its weight diagnostics and its
    target-typicality coverage, from the teacher-forced log-probabilities alone (stage 2b, before
    any score) or with the base responses' judge scores for SNIPS (stage 5)."""
    target_lp, base_lp = np.asarray(target_lp, float), np.asarray(base_lp, float)
    return {**weight_diagnostics(target_lp - base_lp, judge_base),
            "typicality_coverage": target_typicality_coverage(target_lp, base_lp, n_tokens)}


def low_overlap(target: str, figures: Mapping, min_ess_fraction: float, min_typicality_coverage: float) -> Optional[str]:
    """Why importance weights for this target mean little, or None when its overlap is enough."""
    why = []
    if figures["ess_fraction"] < min_ess_fraction:
        why.append(f"effective sample size {figures['ess_fraction']:.1%} of {figures['n']} prompts "
                   f"(validation.min_ess_fraction {min_ess_fraction:g})")
    if figures["typicality_coverage"] < min_typicality_coverage:
        why.append(f"target-typicality coverage {figures['typicality_coverage']:.2f} "
                   f"(validation.min_typicality_coverage {min_typicality_coverage:g})")
    if not why:
        return None
    return (f"{target}: {' and '.join(why)}; the largest weight holds {figures['max_weight_share']:.0%} of "
            "the total, so IPS estimates for it rest on few prompts")


# ---- judge and oracle -------------------------------------------------------------------------

def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    # Constant inputs have no correlation; np.std of five copies of 1/9 is ~1e-17, not 0.
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def mean_se(x: np.ndarray) -> tuple[float | None, float | None]:
    if len(x) == 0:
        return None, None
    return float(np.mean(x)), (float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def discrimination(config: Config, data: Dataset) -> dict:
    """Whether the judge's scores carry signal: their spread, their rank agreement with the oracle
    on the labeled units, and how far each target's mean score lies below the base policy's in
    standard errors (paired by prompt)."""
    base = config.base_policy
    pids = [p.prompt_id for p in data.prompts]
    every = [data.judge[(pid, p.name)] for p in config.policies for pid in pids]
    spreads = {"score": asdict(spread([j.score for j in every])),
               "mean": asdict(spread([j.mean for j in every]))}
    agreement = {}
    for split, policies in (("all", [p.name for p in config.policies]), ("calibration", [base]),
                            ("validation", config.target_policies)):
        keys = [(pid, pol) for pol in policies for pid in pids if (pid, pol) in data.oracle]
        labels = [data.oracle[k].label for k in keys]
        agreement[split] = {"n": len(keys)}
        for what in ("score", "mean"):
            judged = [getattr(data.judge[k], what) for k in keys]
            agreement[split][what] = {
                "spearman": spearman(judged, labels),
                "undefined": spearman_undefined(judged, labels, (f"judge {what}", "oracle label"))}

    def by_prompt(policy: str, what: str) -> dict[str, float]:
        return {pid: getattr(data.judge[(pid, policy)], what) for pid in pids}

    gaps = {t: {what: asdict(paired_gap(by_prompt(base, what), by_prompt(t, what))) for what in ("score", "mean")}
            for t in config.target_policies}
    notes = []
    if spreads["score"]["n_distinct"] == 1:
        notes.append(f"the judge's scores have no spread: all {spreads['score']['n']} deterministic "
                     f"scores are {spreads['score']['lo']:.3g}; they cannot rank responses")
    for what in ("score", "mean"):
        why = agreement["all"][what]["undefined"]
        if why:
            notes.append(f"judge {what} vs oracle label: Spearman correlation undefined ({why})")
    return {"spread": spreads, "judge_vs_oracle": agreement, "base_minus_target": gaps, "notes": notes}
