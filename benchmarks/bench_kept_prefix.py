"""Stage 3 and 4 in process: the rubric kept decoded between calls against decoded once per call.

    python benchmarks/bench_kept_prefix.py [--role judge|oracle] [--units 40] [--rounds 3]
                                           [--data benchmarks/judge_study_set.jsonl | DATA_DIR]

The same units (bench_scoring.py's `load_units`: real responses, grouped by prompt) are scored by
the pipeline's own `LocalScorer` (calls of 8 units, as stages 3 and 4 do) in two ways, side by
side, the order flipping every round:

* kept: as the pipeline runs now: the rubric and worked examples (the prefix every judge prompt
  shares) stay decoded in their own sequence between calls, so only the first call decodes them;
* per call: as before, the kept prefix is forgotten before each call, so every call decodes it;
* the ceiling: a raw replay of the very llama_decode calls and cache operations the kept way
  made (the same tokens, sequence ids and logits rows: the answer position only), so nothing
  but llama.cpp's prefill: what the scorer's own work around it costs.

Both give the same bits (checked here on every unit, and in tests/test_scoring.py). The model is
loaded before the clock starts. The load average is printed before the start (a run that starts
above 1.5 is marked NOT IDLE: its figures are not for the README) and after each round, where
the benchmark's own 2 threads count in it.

The last line is exactly:
kept_vs_per_call=<median of the per-round ratios> (min <a>, max <b>) score_vs_prefill=<x> (min, max)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_llama import Replay  # noqa: E402
from bench_scoring import code_version, idle_verdict, load_average, load_units  # noqa: E402
from ope_prep.config import load_config  # noqa: E402
from ope_prep.backends.scorers import open_scorer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--role", choices=["judge", "oracle"], default="judge")
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "judge_study_set.jsonl"))
    ap.add_argument("--units", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    start_load = os.getloadavg()[0]           # before this benchmark adds its own
    config = load_config(args.config)
    api = getattr(config, args.role)
    config = config.model_copy(update={args.role: api.model_copy(update={"provider": "local"})})
    units = load_units(Path(args.data), args.units, "all")
    print(f"{args.role}: {api.model} ({config.model_path(api.model).name}), rubric {api.rubric}, "
          f"{config.generation.n_threads} threads; {len(units)} units ({len({u.prompt_id for u in units})} "
          f"prompts) from {args.data}\ncode: {code_version()}; load average at start: {load_average()}", flush=True)

    with open_scorer(config, args.role, args.role, config.run.seed, args.role == "judge") as scorer:
        model = scorer.model
        n_tokens = sum(len(scorer.prompt_tokens(u)) for u in units)
        plain = model.answer_logprobs_many
        decoded = [0]

        def per_call(prompts, candidates):
            model._kept_prefix = []          # forgotten: this call decodes the rubric again
            return plain(prompts, candidates)

        ops: list[tuple] = []

        def count(op):
            ops.append(op)
            if op[0] == "decode":
                decoded[0] += len(op[1])

        results: dict[str, dict] = {}

        def run(mode: str) -> tuple[float, int]:
            model.answer_logprobs_many = per_call if mode == "per call" else plain
            model._kept_prefix = []          # each round starts cold
            decoded[0] = 0
            ops.clear()
            model.trace = count
            t = time.perf_counter()
            out = {u.key: (j.digit, j.score, j.mean, j.variance) for u, j in scorer.score(units)}
            dt = time.perf_counter() - t
            model.trace = None
            if mode in results and results[mode] != out:
                raise SystemExit(f"{mode}: another round gave other scores")
            results[mode] = out
            return dt, decoded[0]

        _, kept_decoded = run("kept")        # its llama_decode calls, to replay raw
        replay = Replay(model)
        replay.ops = list(ops)
        built = replay.build("same")

        def run_replay() -> tuple[float, int]:
            model._kept_prefix = []          # the replay's first calls overwrite the kept sequence
            return replay.run(built), kept_decoded

        ratios, ceilings = [], []
        for r in range(args.rounds):
            modes = ["kept", "per call", "replay"] if r % 2 == 0 else ["replay", "per call", "kept"]
            times = {m: run_replay() if m == "replay" else run(m) for m in modes}
            ratios.append(times["per call"][0] / times["kept"][0])
            ceilings.append(times["replay"][0] / times["kept"][0])
            print(f"  round {r + 1} ({modes[0]} first): kept {times['kept'][0]:.1f} s "
                  f"({times['kept'][1]} tokens decoded), per call {times['per call'][0]:.1f} s "
                  f"({times['per call'][1]} tokens decoded), raw replay of the kept calls "
                  f"{times['replay'][0]:.1f} s; speed-up {ratios[-1]:.2f}, kept / replay speed "
                  f"{ceilings[-1]:.2f}; load average {load_average()} (this benchmark's threads included)",
                  flush=True)
        Replay.free(built)
    if results["kept"] != results["per call"]:
        raise SystemExit("kept and per call gave other scores")
    print(f"\n{len(units)} units, {n_tokens} judge-prompt tokens; the same scores both ways on every unit; "
          + idle_verdict(start_load))
    print(f"kept_vs_per_call={statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}) "
          f"score_vs_prefill={statistics.median(ceilings):.2f} (min {min(ceilings):.2f}, max {max(ceilings):.2f})")


if __name__ == "__main__":
    main()
