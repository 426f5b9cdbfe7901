"""What rounds cost: a whole run of N prompts in one pass against the same run in rounds.

    python benchmarks/bench_rounds.py [--n 32] [--first-round 8] [--growth 2] [--max-tokens 32] [--reps 2]

Both arms are the real runner (`run_pipeline.py N`) on the embedded default, each in a fresh data
directory, with only run.first_round differing (0: one pass; --first-round: rounds of first_round,
first_round x growth, ..., N, each ending in stage 5 and a snapshot). generation.max_tokens is
lowered (--max-tokens) so that a rep takes minutes. Reps alternate the order of the two arms.

A round costs a fixed F over the units it computes (each stage's process start, config check,
model load, stage 5 on everything so far, a snapshot), so the overhead is (rounds - 1) x F over
the single pass. Printed: each rep's times and ratio, F per extra round, and what that F means
for the default schedule (first_round 100, growth 2) on 10,000 prompts taking the README's
projected 49 h.

The last line is exactly: rounds_vs_single=<median of the per-rep ratios>
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ope_prep.rounds import round_sizes  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--first-round", type=int, default=8)
    ap.add_argument("--growth", type=float, default=2.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    return ap.parse_args()


def one_run(args, workdir: Path, first_round: int) -> float:
    cfg = yaml.safe_load(Path(args.config).read_text())
    base = Path(args.config).resolve().parent
    for m in cfg["models"].values():
        m["path"] = str((base / m["path"]).resolve())
    cfg["paths"]["data_dir"] = str(workdir / "data")
    cfg["generation"]["max_tokens"] = args.max_tokens
    cfg.setdefault("run", {}).update(first_round=first_round, round_growth=args.growth)
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    started = time.monotonic()
    p = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), str(args.n), "--config", str(config)],
                       cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if p.returncode != 0:
        sys.exit(f"run_pipeline.py failed (first_round {first_round}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return seconds


def main() -> None:
    args = parse_args()
    rounds = round_sizes(args.n, args.first_round, args.growth)
    print(f"N {args.n}, rounds {rounds}, max_tokens {args.max_tokens}, {args.reps} reps")
    ratios, extra = [], []
    for rep in range(args.reps):
        times = {}
        order = ("single", "rounds") if rep % 2 == 0 else ("rounds", "single")
        for arm in order:
            with tempfile.TemporaryDirectory(prefix=f"bench_rounds_{arm}_") as tmp:
                times[arm] = one_run(args, Path(tmp), 0 if arm == "single" else args.first_round)
        ratio = times["rounds"] / times["single"]
        ratios.append(ratio)
        extra.append((times["rounds"] - times["single"]) / max(len(rounds) - 1, 1))
        print(f"rep {rep + 1}: single {times['single']:.0f}s, rounds {times['rounds']:.0f}s, "
              f"ratio {ratio:.3f}, F = {extra[-1]:.1f}s per extra round", flush=True)
    f = statistics.median(extra)
    default_rounds = len(round_sizes(10000, 100, 2.0))
    print(f"ratio rounds/single per rep: {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"F (cost of one extra round): median {f:.1f}s, per rep {', '.join(f'{x:.1f}' for x in extra)}")
    print(f"default schedule on 10,000 prompts: {default_rounds} rounds, so {default_rounds - 1} x F = "
          f"{(default_rounds - 1) * f / 60:.1f} min over a ~49 h single pass: "
          f"{(default_rounds - 1) * f / (49 * 3600):.2%}")
    print(f"rounds_vs_single={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
