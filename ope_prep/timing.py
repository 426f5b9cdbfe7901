"""How long a run takes, timed, not derived: the local stages run for real on two sizes of a
sample, each stage's wall time is fitted as fixed start-up (process, config checks, model loads)
plus per-prompt work, and the fit is projected to N prompts in the config's rounds.

Stage 2b's self-checks (each policy's own responses under itself, units.self_check_prompts) are
per prompt only up to SELF_CHECKS_PER_POLICY prompts, so they are timed apart: each model's
teacher-forcing seconds (logprobs_usage.json) are split between the pass's units and the
self-checks by their tokens, and the self-checks are projected by how many a run computes over
its rounds.

`run_pipeline.py N --plan` times small sizes once; benchmarks/bench_run.py times larger ones,
in several rounds, for the README's figure. Both use this module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import Config
from .files import LOGPROBS, PROJECT_DIR, SELF_CONSISTENCY, usage_file
from .records import SelfCheck, TeacherForced
from .stages import STAGES
from .stages.units import self_check_prompts
from .store import read_jsonl

# Stages that go over every prompt done so far in every round (stage 1 draws the sample again,
# stage 5 checks and summarizes all files); the others compute only a round's new prompts.
WHOLE_PASS = {"prepare", "summarize"}


class ProbeFailed(Exception):
    pass


@dataclass(frozen=True)
class StageTimes:
    """One probe: wall seconds per stage, and of stage 2b's the share its self-checks took."""
    seconds: dict[str, float]
    self_check_s: float = 0.0
    self_check_units: int = 0


@dataclass(frozen=True)
class StageFit:
    fixed_s: float          # paid once per run of the stage (per round)
    per_prompt_s: float
    per_self_check_s: float = 0.0    # stage 2b only


def local_stages(config: Config) -> list[str]:
    """The stages that run on this machine, in order, up to the first that does not (an API
    judge, policies on an engine): a later stage needs its outputs. Nothing is paid to time them."""
    local = {"prepare", "generate", "logprobs", "summarize"}
    local |= {name for name, api in (("judge", config.judge), ("oracle", config.oracle)) if not api.kind.priced}
    if any(m.endpoint for m in config.models.values()):
        local -= {"generate", "logprobs"}
    stages = []
    for name, _ in STAGES:
        if name not in local:
            break
        stages.append(name)
    return stages


def time_stages(config: Config, samples: int, stages: list[str], prepare_flags: list[str]) -> StageTimes:
    """Wall seconds of each of `stages` run in order, each as its own process like the runner
    starts it, on `samples` prompts in a scratch data directory (removed after)."""
    raw = yaml.safe_load(Path(config.config_path).read_text(encoding="utf-8"))
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="ope_timing_") as tmp:
        data_dir = Path(tmp) / "data"
        raw.setdefault("paths", {})["data_dir"] = str(data_dir)
        # beside the config, so that its relative paths mean what they mean there
        probe_cfg = Path(config.config_path).parent / f".timing_probe_{Path(tmp).name}.yaml"
        probe_cfg.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        try:
            for name in stages:
                cmd = [sys.executable, str(PROJECT_DIR / dict(STAGES)[name]), "--config", str(probe_cfg)]
                if name == "prepare":
                    cmd += ["--samples", str(samples), *prepare_flags]
                started = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_DIR)
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    raise ProbeFailed(f"stage {name} failed on {samples} prompts ({last})")
                seconds[name] = time.perf_counter() - started
        finally:
            probe_cfg.unlink(missing_ok=True)
        if "logprobs" not in seconds:
            return StageTimes(seconds)
        self_s, units = _self_check_share(config, data_dir)
        return StageTimes(seconds, self_s, units)


def _self_check_share(config: Config, data_dir: Path) -> tuple[float, int]:
    """Seconds of stage 2b's self-checks in a finished probe, and how many there were: each
    model's teacher-forcing seconds times the self-checks' share of the tokens it scored."""
    usage = json.loads((data_dir / usage_file("logprobs")).read_text(encoding="utf-8"))
    model_of = {p.name: p.model for p in config.policies}
    main: dict[str, int] = {}
    own: dict[str, int] = {}
    for r in read_jsonl(data_dir / LOGPROBS, TeacherForced):
        main[model_of[r.policy]] = main.get(model_of[r.policy], 0) + r.n_tokens
    checks = read_jsonl(data_dir / SELF_CONSISTENCY, SelfCheck)
    for r in checks:
        own[model_of[r.policy]] = own.get(model_of[r.policy], 0) + len(r.token_logprobs)
    seconds = sum(usage[m].get("seconds", 0.0) * own.get(m, 0) / (main.get(m, 0) + own.get(m, 0))
                  for m in usage if main.get(m, 0) + own.get(m, 0))
    return seconds, len(checks)


def fit(small: int, small_times: StageTimes, large: int, large_times: StageTimes) -> dict[str, StageFit]:
    """Each stage's line through its two timings (neither part below zero: a stage whose larger
    run was faster is all start-up); stage 2b's self-checks apart, per self-check."""
    fits = {}
    for name in small_times.seconds:
        t_small, t_large = small_times.seconds[name], large_times.seconds[name]
        per_check = 0.0
        if name == "logprobs" and small_times.self_check_units + large_times.self_check_units:
            t_small -= small_times.self_check_s
            t_large -= large_times.self_check_s
            per_check = ((small_times.self_check_s + large_times.self_check_s)
                         / (small_times.self_check_units + large_times.self_check_units))
        per = max((t_large - t_small) / (large - small), 0.0)
        fits[name] = StageFit(fixed_s=max(t_large - per * large, 0.0), per_prompt_s=per, per_self_check_s=per_check)
    return fits


def self_checks_over_run(config: Config, rounds: list[int]) -> int:
    """How many self-checks stage 2b computes over a run that stops at each of `rounds`: a check
    once computed is kept (counted on stand-in prompt ids: the choice is by position)."""
    ids = [f"prompt-{i}" for i in range(rounds[-1])]
    chosen = set().union(*(self_check_prompts(ids[:n]) for n in rounds))
    return len(chosen) * len(config.policies)


def project(fits: dict[str, StageFit], rounds: list[int], self_checks: int = 0) -> dict[str, float]:
    """Seconds of each stage over a whole run that stops at each of `rounds` (prompt counts, the
    last is N): start-up once per round, per-prompt work once per prompt, or, for WHOLE_PASS
    stages, once per prompt per round it is in; stage 2b's `self_checks` at their own cost."""
    n = rounds[-1]
    prompt_rounds = sum(rounds)
    return {name: len(rounds) * f.fixed_s + f.per_prompt_s * (prompt_rounds if name in WHOLE_PASS else n)
            + f.per_self_check_s * self_checks
            for name, f in fits.items()}


def fmt_h(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds / 60:,.1f} min"
