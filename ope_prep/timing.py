"""How long a run takes, timed, not derived: the local stages run for real on two sizes of a
sample, each stage's wall time is fitted as fixed start-up (process, config checks, model loads)
plus per-prompt work, and the fit is projected to N prompts in the config's rounds.

`run_pipeline.py N --plan` times small sizes once; benchmarks/bench_run.py times larger ones,
in several rounds, for the README's figure. Both use this module.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import PROJECT_DIR, Config
from .stages import STAGES

# Stages that go over every prompt done so far in every round (stage 1 draws the sample again,
# stage 5 checks and summarizes all files); the others compute only a round's new prompts.
WHOLE_PASS = {"prepare", "summarize"}


class ProbeFailed(Exception):
    pass


@dataclass(frozen=True)
class StageFit:
    fixed_s: float          # paid once per run of the stage (per round)
    per_prompt_s: float


def local_stages(config: Config) -> list[str]:
    """The stages that run on this machine, in order, up to the first that does not (an API
    judge, policies on an engine): a later stage needs its outputs. Nothing is paid to time them."""
    local = {"prepare", "generate", "logprobs", "summarize"}
    local |= {name for name, api in (("judge", config.judge), ("oracle", config.oracle)) if api.provider != "openai"}
    if any(m.endpoint for m in config.models.values()):
        local -= {"generate", "logprobs"}
    stages = []
    for name, _ in STAGES:
        if name not in local:
            break
        stages.append(name)
    return stages


def time_stages(config: Config, samples: int, stages: list[str], prepare_flags: list[str]) -> dict[str, float]:
    """Wall seconds of each of `stages` run in order, each as its own process like the runner
    starts it, on `samples` prompts in a scratch data directory (removed after)."""
    raw = yaml.safe_load(Path(config.config_path).read_text(encoding="utf-8"))
    times = {}
    with tempfile.TemporaryDirectory(prefix="ope_timing_") as tmp:
        raw.setdefault("paths", {})["data_dir"] = str(Path(tmp) / "data")
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
                times[name] = time.perf_counter() - started
        finally:
            probe_cfg.unlink(missing_ok=True)
    return times


def fit(small: int, small_times: dict[str, float], large: int, large_times: dict[str, float]) -> dict[str, StageFit]:
    """Each stage's line through its two timings (neither part below zero: a stage whose larger
    run was faster is all start-up)."""
    fits = {}
    for name in small_times:
        per = max((large_times[name] - small_times[name]) / (large - small), 0.0)
        fits[name] = StageFit(fixed_s=max(large_times[name] - per * large, 0.0), per_prompt_s=per)
    return fits


def project(fits: dict[str, StageFit], rounds: list[int]) -> dict[str, float]:
    """Seconds of each stage over a whole run that stops at each of `rounds` (prompt counts, the
    last is N): start-up once per round, per-prompt work once per prompt, or, for WHOLE_PASS
    stages, once per prompt per round it is in."""
    n = rounds[-1]
    prompt_rounds = sum(rounds)
    return {name: len(rounds) * f.fixed_s + f.per_prompt_s * (prompt_rounds if name in WHOLE_PASS else n)
            for name, f in fits.items()}


def run_rounds(config: Config, n: int) -> list[int]:
    from .pipeline import round_sizes
    return round_sizes(n, config.run.first_round, config.run.round_growth)


def fmt_h(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds / 60:,.1f} min"
