"""run_pipeline.py N --plan: what a run of N prompts will ask for, before any of it is spent.

The sample is drawn exactly as stage 1 draws it (nothing written), so the prompt counts and
prompt tokens are exact. Response tokens are bounded by generation.max_tokens, so token counts
and API costs are upper bounds. Local wall time is projected from a probe: the stages that run
on local models run for real on two small samples in scratch directories, fitted as start-up +
per-prompt work (timing.py; API stages are not probed: that would spend money).
"""

from __future__ import annotations

from .config import ApiConfig, Config
from .rubrics import RUBRICS
from .stages import STAGES
from .rounds import prepare_flags, run_rounds
from .timing import ProbeFailed, fit, fmt_h, local_stages, project, self_checks_over_run, time_stages


def _scorer_line(name: str, api: ApiConfig, calls: float, tokenizer, prompts, max_tokens: int, seed: int) -> tuple[str, float]:
    """Calls, input tokens (rubric + prompt + a response of max_tokens, counted with the base
    model's tokenizer: other tokenizers differ by some percent) and the cost bound."""
    from .judging import judge_messages
    filler = "word " * max_tokens
    per_prompt = [len(tokenizer.chat_tokens(judge_messages(RUBRICS[api.rubric], p.prompt, filler, seed)))
                  for p in prompts]
    input_tokens = calls * sum(per_prompt) / len(per_prompt)
    output_tokens = calls * api.max_tokens
    where = api.model if api.kind.priced else f"models.{api.model} ({api.provider})"
    cost = api.usd(input_tokens, output_tokens) if api.kind.priced else 0.0
    line = (f"{name}: {calls:,.0f} calls to {where}; <= {input_tokens:,.0f} input tokens, {output_tokens:,.0f} "
            f"output tokens" + (f"; <= ${cost:,.2f}" if api.kind.priced else ""))
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
            engine_cost += model.endpoint.usd(in_tok + out_tok, out_tok)
    total = judge_cost + oracle_cost + engine_cost
    lines.append(f"API cost: <= ${total:,.2f} (judge ${judge_cost:,.2f}, oracle ${oracle_cost:,.2f}, engines "
                 f"${engine_cost:,.2f}; from the prices in the config, every response at max_tokens)")
    lines += _probe(config, args, n, seed)
    return "\n".join(lines)


def _probe(config: Config, args, n: int, seed: int) -> list[str]:
    """The local stages timed for real on K and 4K prompts in scratch directories, fitted as
    start-up + per-prompt work (timing.py), and projected to n prompts in the config's rounds."""
    small, large = args.plan_probe, 4 * args.plan_probe
    stages, flags = local_stages(config), prepare_flags(args)
    try:
        fits = fit(small, time_stages(config, small, stages, flags), large, time_stages(config, large, stages, flags))
    except ProbeFailed as e:
        return [f"Probe: {e}; no time projected"]
    rounds = run_rounds(config, n)
    checks = self_checks_over_run(config, rounds)
    seconds = project(fits, rounds, checks)
    out = [f"Local wall time, timed on {small} and {large} prompts, fitted as start-up + per-prompt work, and "
           f"projected to {n:,} prompts in {len(rounds)} round(s) of the config (start-up once per round):"]
    out += [f"  {name}: {f.fixed_s:.0f} s start-up + {f.per_prompt_s:.2f} s per prompt"
            + (f" + {f.per_self_check_s:.2f} s per self-check ({checks:,} over the run)" if f.per_self_check_s else "")
            + f" -> {fmt_h(seconds[name])}" for name, f in fits.items()]
    skipped = [name for name, _ in STAGES if name not in fits]
    out.append(f"  total ~{fmt_h(sum(seconds.values()))}" +
               (f"; not probed: {', '.join(skipped)} (API, or after one)" if skipped else ""))
    return out
