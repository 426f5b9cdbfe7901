"""How long a 10,000-prompt run of a config takes on this machine, timed end to end.

    python benchmarks/bench_run.py [--config config.yaml] [--small 10] [--large 40] [--rounds 2]
                                   [--n 10000]

Every local stage runs for real, each in its own process as the runner starts it, on the first
`small` and the first `large` prompts of the config's own sample (a scratch data directory each,
removed after), the order of the two sizes flipping every round. Each round's two timings give
each stage's fixed start-up and per-prompt work (ope_prep/timing.py, which `--plan` uses too),
projected to N prompts in the config's rounds (start-up once per round; stages 1 and 5 go over
every prompt done so far, every round). Stage 2b's self-checks, one per prompt and policy only up to
200 prompts, are timed apart and projected by how many a run computes (timing.py). API stages are
not run (nothing is paid).

The figures hold for the prompts timed: the first `large` of the sample, in the mix's shares;
a larger `large` says more about the prompts of a 10,000 run and takes longer (~12 min per 40
prompts of the default here). The load average is printed before the start (a run that starts
above 1.5 is marked NOT IDLE: its figures are not for the README) and after each round.
The output is also written to benchmarks/last_bench_run.txt (--output).

The last line is exactly: projected_10k_h=<median over rounds> (min <a>, max <b>)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scoring import code_version, idle_verdict, load_average  # noqa: E402
from ope_prep.config import load_config  # noqa: E402
from ope_prep.rounds import run_rounds  # noqa: E402
from ope_prep.timing import fit, fmt_h, local_stages, project, self_checks_over_run, time_stages  # noqa: E402

OUTPUT = ROOT / "benchmarks" / "last_bench_run.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--large", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=10000, help="the run size projected to")
    ap.add_argument("--output", default=str(OUTPUT), help=f"also written here (default {OUTPUT.relative_to(ROOT)})")
    args = ap.parse_args()
    if not 0 < args.small < args.large:
        ap.error("give 0 < --small < --large")
    start_load = os.getloadavg()[0]
    config = load_config(args.config)
    stages = local_stages(config)
    rounds_of_run = run_rounds(config, args.n)
    checks = self_checks_over_run(config, rounds_of_run)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"config {args.config}; stages timed: {', '.join(stages)}; sizes {args.small} and {args.large} prompts, "
        f"{args.rounds} rounds")
    say(f"projected to {args.n:,} prompts in the config's {len(rounds_of_run)} rounds ({', '.join(map(str, rounds_of_run))})")
    say(f"code: {code_version()}; load average at start: {load_average()}")
    totals, per_stage = [], {name: [] for name in stages}
    for r in range(args.rounds):
        sizes = [args.small, args.large] if r % 2 == 0 else [args.large, args.small]
        timed = {k: time_stages(config, k, stages, []) for k in sizes}
        fits = fit(args.small, timed[args.small], args.large, timed[args.large])
        seconds = project(fits, rounds_of_run, checks)
        totals.append(sum(seconds.values()))
        say(f"\nround {r + 1} ({sizes[0]} prompts first); load average after it {load_average()} "
            "(this benchmark's own threads included)")
        say(f"  {'stage':<10}{args.small:>6} prompts{args.large:>6} prompts   start-up   per prompt   {args.n:,} prompts")
        for name in stages:
            f = fits[name]
            per_stage[name].append(seconds[name])
            say(f"  {name:<10}{timed[args.small].seconds[name]:>12.1f} s{timed[args.large].seconds[name]:>12.1f} s"
                f"{f.fixed_s:>9.1f} s{f.per_prompt_s:>11.2f} s   {fmt_h(seconds[name]):>10}")
        if "logprobs" in fits:
            f = fits["logprobs"]
            say(f"  logprobs' self-checks: {timed[args.small].self_check_s:.1f} s for {timed[args.small].self_check_units} "
                f"and {timed[args.large].self_check_s:.1f} s for {timed[args.large].self_check_units} (left out of its "
                f"line above), {f.per_self_check_s:.2f} s each; {checks:,} over the run: "
                f"{fmt_h(f.per_self_check_s * checks)}, in its {args.n:,}-prompt figure")
        say(f"  total{'':<45}{fmt_h(totals[-1]):>22}")
    say("\nper stage over the rounds (median, min-max): " + "; ".join(
        f"{name} {fmt_h(statistics.median(v))} ({fmt_h(min(v))}-{fmt_h(max(v))})" for name, v in per_stage.items()))
    skipped = [s for s in ("prepare", "generate", "logprobs", "judge", "oracle", "summarize") if s not in stages]
    if skipped:
        say(f"not timed (an API, or after one): {', '.join(skipped)}")
    say(idle_verdict(start_load))
    h = [t / 3600 for t in totals]
    say(f"projected_10k_h={statistics.median(h):.1f} (min {min(h):.1f}, max {max(h):.1f})"
        if args.n == 10000 else
        f"projected_{args.n}_h={statistics.median(h):.1f} (min {min(h):.1f}, max {max(h):.1f})")
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
