"""run_pipeline.py N --plan: what a run of N prompts will ask for, before any of it is spent.

The sample is drawn exactly as stage 1 draws it (nothing written), so the prompt counts and
prompt tokens are exact. Response tokens are bounded by generation.max_tokens, so token counts
and API costs are upper bounds. Local wall time is projected from a probe: the stages that run
on local models, run for real on a few prompts in a scratch directory (API stages are not
probed: that would spend money).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .config import PROJECT_DIR, ApiConfig, Config
from .rubrics import RUBRICS
from .stages import STAGES


def _cost(api, input_tokens: float, output_tokens: float) -> float:
    return (input_tokens * api.usd_per_1k_input_tokens + output_tokens * api.usd_per_1k_output_tokens) / 1000


def _scorer_line(name: str, api: ApiConfig, calls: float, tokenizer, prompts, max_tokens: int, seed: int) -> tuple[str, float]:
    """Calls, input tokens (rubric + prompt + a response of max_tokens, counted with the base
    model's tokenizer: other tokenizers differ by some percent) and the cost bound."""
    from .stages.scoring import judge_messages
    filler = "word " * max_tokens
    per_prompt = [len(tokenizer.chat_tokens(judge_messages(RUBRICS[api.rubric], p.prompt, filler, seed)))
                  for p in prompts]
    input_tokens = calls * sum(per_prompt) / len(per_prompt)
    output_tokens = calls * api.max_tokens
    where = api.model if api.provider == "openai" else f"models.{api.model} ({api.provider})"
    cost = _cost(api, input_tokens, output_tokens) if api.provider == "openai" else 0.0
    line = (f"{name}: {calls:,.0f} calls to {where}; <= {input_tokens:,.0f} input tokens, {output_tokens:,.0f} "
            f"output tokens" + (f"; <= ${cost:,.2f}" if api.provider == "openai" else ""))
    return line, cost


def plan_text(config: Config, args) -> str:
    from .backends.providers import local_tokenizer
    from .stages.prepare import draw, run_seed
    n, seed = args.samples, run_seed(config, args)
    sample = draw(config, args, n)      # exactly as stage 1 draws it
    prompts = sample.prompts
    pols, max_tokens = config.policies, config.generation.max_tokens
    n_targets = len(config.target_policies)
    tokenizers = {k: local_tokenizer(config, k) for k in dict.fromkeys(p.model for p in pols)}
    lines = [f"Plan for {n:,} prompts (config {config.config_path}, seed {seed}); nothing was written.",
             "Prompts: " + ", ".join(f"{src} {c:,}" for src, c in sample.counts.items())]
    prompt_tokens = {p.name: sum(len(tokenizers[p.model].prompt_tokens(p.system_prompt, q.prompt)) for q in prompts)
                     for p in pols}
    lines.append(f"Stage 2: {n * len(pols):,} generations ({len(pols)} policies); prompt tokens "
                 f"{sum(prompt_tokens.values()):,}; generated tokens <= {n * len(pols) * max_tokens:,}")
    clone = 1 if config.clone_policy else 0
    lines.append(f"Stage 2b: {n * (len(pols) + clone):,} teacher-forced sequences (the base policy's response under "
                 f"each of {len(pols)} policies" + (", the clone's own" if clone else "") + "), plus the self-checks")
    oracle_calls = n * (config.oracle.calibration_fraction + n_targets * config.oracle.validation_fraction)
    base_tok = tokenizers[config.policy(config.base_policy).model]
    judge_line, judge_cost = _scorer_line("Stage 3 judge", config.judge, n * len(pols), base_tok, prompts[:200],
                                          max_tokens, seed)
    oracle_line, oracle_cost = _scorer_line("Stage 4 oracle (expected)", config.oracle, oracle_calls, base_tok,
                                            prompts[:200], max_tokens, seed)
    lines += [judge_line, oracle_line]
    engine_cost = 0.0
    for key, model in config.models.items():
        if model.endpoint:
            users = [p.name for p in pols if p.model == key]
            in_tok = sum(prompt_tokens[u] for u in users) * 2      # generation, then teacher forcing
            out_tok = n * len(users) * max_tokens
            engine_cost += _cost(model.endpoint, in_tok + out_tok, out_tok)
    total = judge_cost + oracle_cost + engine_cost
    lines.append(f"API cost: <= ${total:,.2f} (judge ${judge_cost:,.2f}, oracle ${oracle_cost:,.2f}, engines "
                 f"${engine_cost:,.2f}; from the prices in the config, every response at max_tokens)")
    lines += _probe(config, args, n)
    return "\n".join(lines)


def _probe(config: Config, args, n: int) -> list[str]:
    """Run the local stages on a few prompts in a scratch directory; project their time to n."""
    k = args.plan_probe
    local = {"prepare", "generate", "logprobs", "summarize"}
    local |= {name for name, api in (("judge", config.judge), ("oracle", config.oracle)) if api.provider != "openai"}
    if any(m.endpoint for m in config.models.values()):
        local -= {"generate", "logprobs"}
    raw = yaml.safe_load(Path(config.config_path).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="ope_plan_") as tmp:
        raw.setdefault("paths", {})["data_dir"] = str(Path(tmp) / "data")
        probe_cfg = Path(config.config_path).parent / f".plan_probe_{Path(tmp).name}.yaml"
        probe_cfg.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        try:
            times = {}
            for name, script in STAGES:
                if name not in local:
                    break        # a later stage needs this one's outputs
                cmd = [sys.executable, str(PROJECT_DIR / script), "--config", str(probe_cfg)]
                if name == "prepare":
                    from .pipeline import prepare_flags
                    cmd += ["--samples", str(k), *prepare_flags(args)]
                started = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_DIR)
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    return [f"Probe: stage {name} failed on {k} prompts ({last}); no time projected"]
                times[name] = time.time() - started
        finally:
            probe_cfg.unlink(missing_ok=True)
    out = [f"Local wall time, projected from a probe of {k} prompts (each stage's start-up included, so "
           "high for small N):"]
    fixed = {"prepare", "summarize"}     # mostly start-up and one pass over the files: not scaled
    for name, t in times.items():
        out.append(f"  {name}: {t:.0f} s" if name in fixed else
                   f"  {name}: {t:.0f} s for {k} -> ~{t / k * n / 3600:,.1f} h for {n:,}")
    total = sum(t if name in fixed else t / k * n for name, t in times.items()) / 3600
    skipped = [name for name, _ in STAGES if name not in times]
    out.append(f"  total ~{total:,.1f} h" + (f"; not probed: {', '.join(skipped)} (API, or after one)" if skipped else ""))
    return out

