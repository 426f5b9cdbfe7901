"""A run's rounds: the prompt counts at which the runner stops for a snapshot, and the runner's
flags that every round passes on to stage 1. Read by the runner (pipeline.py), --plan and the
timed projection (timing.py)."""

from __future__ import annotations

import math

from .config import Config


def round_sizes(n: int, first: int, growth: float) -> list[int]:
    """first, first * growth, ... (each rounded up), then n: the prompt counts at which a run
    stops for a snapshot. first = 0 or first >= n: a single pass."""
    sizes = []
    size = first
    while 0 < size < n:
        sizes.append(size)
        size = max(size + 1, math.ceil(size * growth))
    return sizes + [n]


def run_rounds(config: Config, n: int) -> list[int]:
    """The rounds of a run of n prompts under config."""
    return round_sizes(n, config.run.first_round, config.run.round_growth)


def prepare_flags(args) -> list[str]:
    """The runner's flags that stage 1 takes too."""
    flags = ["--seed", str(args.seed)] if args.seed is not None else []
    for g in args.only:
        flags += ["--only", g]
    for g in args.exclude:
        flags += ["--exclude", g]
    return flags
