#!/usr/bin/env python
"""The judge study (issue 10): which judge and oracle set-up gives scores with signal on the
embedded default. Real models, in process (LocalScorer), on a fixed set of default-run responses:

    python scripts/judge_study.py                      # score (cached) and print the tables
    python scripts/judge_study.py --make-set DATA_DIR  # (re)build the set from a default run

The set (benchmarks/judge_study_set.jsonl) is one row per (prompt, policy) response of a 40-prompt
default run: prompt_id, policy, prompt, response. Each candidate scorer, a (model, rubric) pair, is
run once over the set's units of ``--policies`` and its judgements are cached (by model file,
rubric digest and set digest) in ``--cache``, so a rerun prints at once and a new candidate costs
only itself.

Printed: per scorer, the spread of its deterministic score (the most likely digit) and of its
mean, the p0 - pi_bad gap of each in standard errors (paired by prompt), and its time; then per
(judge, oracle) pair of scorers on different models, the Spearman correlation of the judge's score
and mean with the oracle's label (the oracle's deterministic score). Figures: ope_prep.diagnostics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ope_prep.config import load_config                                   # noqa: E402
from ope_prep.diagnostics import paired_gap, spearman, spread            # noqa: E402
from ope_prep.records import Prompt, Response                             # noqa: E402
from ope_prep.rubrics import RUBRICS                                      # noqa: E402
from ope_prep.backends.providers import scoring_model   # noqa: E402
from ope_prep.backends.scorers import LocalScorer, ScoringUnit  # noqa: E402
from ope_prep.judging import Judgement, rubric_digest  # noqa: E402
from ope_prep.files import PROMPTS, RESPONSES, work_path                   # noqa: E402
from ope_prep.store import read_jsonl, write_jsonl                        # noqa: E402

SET = ROOT / "benchmarks" / "judge_study_set.jsonl"
MODELS = ("smollm2_135m", "gemma3_270m")
# Every candidate tried, in the order they were run (each on both models).
RUBRIC_NAMES = ("helpful_0_9_fewshot", "helpful_0_9", "verdict_0_1_fewshot", "verdict_0_1",
                "quality_1_5_fewshot", "quality_1_5")
BASE, BAD = "p0", "pi_bad"


def make_set(data_dir: Path, out: Path, policies: list[str]) -> None:
    """Every prompt of the run that has a response from each of `policies`, in prompt order. While
    stage 2 is still running, its finished units (work/generate.jsonl) stand in for responses.jsonl."""
    prompts = read_jsonl(data_dir / PROMPTS, Prompt)
    if (data_dir / RESPONSES).is_file():
        responses = read_jsonl(data_dir / RESPONSES, Response)
    else:
        rows = read_jsonl(work_path(data_dir, "generate"))[1:]          # after the header
        responses = [Response(**r["record"]) for r in rows if r["status"] == "ok"]
    by_key = {(r.prompt_id, r.policy): r.response for r in responses}
    rows = [{"prompt_id": p.prompt_id, "policy": policy, "prompt": p.prompt, "response": by_key[p.prompt_id, policy]}
            for p in prompts if all((p.prompt_id, q) in by_key for q in policies) for policy in policies]
    write_jsonl(out, rows)
    print(f"{out}: {len(rows)} responses ({', '.join(policies)}) to {len(rows) // len(policies)} prompts, "
          f"{out.stat().st_size} bytes", file=sys.stderr)


def score_vector(config, model: str, rubric_name: str, units: list[ScoringUnit], run_seed: int,
                 cache_dir: Path, set_digest: str, cached_only: bool = False
                 ) -> tuple[dict[str, Judgement], float] | None:
    """{unit key: judgement} and the seconds it took (when it was computed, as cached); None when
    `cached_only` and it is not in the cache."""
    rubric = RUBRICS[rubric_name]
    model_file = config.model_path(model)
    key = hashlib.sha256(json.dumps([model_file.name, model_file.stat().st_size, rubric_digest(rubric),
                                     set_digest, run_seed]).encode()).hexdigest()[:16]
    path = cache_dir / f"{model}.{rubric_name}.{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        return {k: Judgement(**j) for k, j in cached["judgements"].items()}, cached["seconds"]
    if cached_only:
        return None
    t = time.monotonic()
    scorer = LocalScorer(scoring_model(config, model), rubric, run_seed)
    try:
        out = {u.key: j for u, j in scorer.score(units)}
        tokens = scorer.tokens_done
    finally:
        scorer.close()
    seconds = time.monotonic() - t
    bad = [k for k, j in out.items() if not isinstance(j, Judgement)]
    if bad:
        raise SystemExit(f"{model} {rubric_name}: {len(bad)} units failed, e.g. {bad[0]}: {out[bad[0]]}")
    print(f"  {model} {rubric_name}: {len(units)} units, {tokens} prompt tokens in {seconds:.0f}s "
          f"({tokens / seconds:.0f} tokens/s)", file=sys.stderr)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": seconds, "judgements": {k: asdict(j) for k, j in out.items()}}))
    return out, seconds


def fmt(x, spec: str = "+.2f") -> str:
    return "n/a" if x is None else format(x, spec)


def gap_z(units: list[ScoringUnit], values: dict[str, float]) -> float | None:
    by = lambda policy: {u.prompt_id: values[u.key] for u in units if u.policy == policy}   # noqa: E731
    return paired_gap(by(BASE), by(BAD)).z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", type=Path, default=SET)
    ap.add_argument("--make-set", type=Path, metavar="DATA_DIR", help="build --set from a default run's data dir")
    ap.add_argument("--config", type=Path, default=ROOT / "config.yaml", help="for the models")
    ap.add_argument("--policies", default="p0,pi_clone,pi_bad")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rubrics", default=",".join(RUBRIC_NAMES))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ope_prep" / "judge_study")
    ap.add_argument("--cached-only", action="store_true", help="print the candidates already scored, score none")
    args = ap.parse_args()
    policies = args.policies.split(",")
    if args.make_set:
        make_set(args.make_set, args.set, policies)
        return

    config = load_config(args.config)
    rows = [r for r in read_jsonl(args.set) if r["policy"] in policies]
    units = [ScoringUnit(f"{r['prompt_id']}/{r['policy']}", r["prompt_id"], r["policy"], r["prompt"], r["response"])
             for r in rows]
    set_digest = hashlib.sha256(args.set.read_bytes()).hexdigest() + args.policies
    n_prompts = len({u.prompt_id for u in units})
    print(f"set: {args.set.name}, {len(units)} responses ({', '.join(policies)}) to {n_prompts} prompts; "
          f"run seed {config.run.seed}\n")

    vectors: dict[tuple[str, str], dict[str, Judgement]] = {}
    print(f"{'scorer (model, rubric)':40} {'score std':>9} {'#':>2} {'mean std':>9} {'#':>3} "
          f"{'gap z score':>11} {'gap z mean':>10} {'digits (argmax counts)':24} {'time':>6}")
    for model in args.models.split(","):
        for name in args.rubrics.split(","):
            got = score_vector(config, model, name, units, config.run.seed, args.cache, set_digest, args.cached_only)
            if got is None:
                continue
            j, seconds = got
            vectors[(model, name)] = j
            score = {k: v.score for k, v in j.items()}
            mean = {k: v.mean for k, v in j.items()}
            s, m = spread(list(score.values())), spread(list(mean.values()))
            digits = sorted({v.digit for v in j.values()})
            counts = " ".join(f"{d}:{sum(v.digit == d for v in j.values())}" for d in digits)
            print(f"{model + ' ' + name:40} {s.std:9.3f} {s.n_distinct:2d} {m.std:9.3f} {m.n_distinct:3d} "
                  f"{fmt(gap_z(units, score)):>11} {fmt(gap_z(units, mean)):>10} {counts:24} {seconds:5.0f}s",
                  flush=True)

    print(f"\njudge-oracle Spearman over the {len(units)} responses (oracle label = the oracle's most likely digit)")
    print(f"{'judge':32} {'oracle (labels)':32} {'rho score':>9} {'rho mean':>9}")
    for (jm, jr), j in vectors.items():
        for (om, orr), o in vectors.items():
            if om == jm:
                continue
            labels = [o[u.key].score for u in units]
            rho_s = spearman([j[u.key].score for u in units], labels)
            rho_m = spearman([j[u.key].mean for u in units], labels)
            print(f"{jm + ' ' + jr:32} {om + ' ' + orr:32} {fmt(rho_s):>9} {fmt(rho_m):>9}")


if __name__ == "__main__":
    main()
