#!/usr/bin/env python
"""Load the CJE export with cje-eval 0.3 and estimate every target policy two ways.

Runs inside the cje-eval venv (scripts/cje_env.py prints its python); it imports only cje and
the standard library, never ope_prep:

    $(python scripts/cje_env.py) scripts/cje_roundtrip.py data/cje

It loads ``<cje_dir>/logged_data.jsonl`` with ``cje.load_dataset_from_jsonl`` and estimates with
the calibrated IPS estimator (logged data only) and the doubly robust DR-CPO estimator (logged
data + the fresh draws in ``<cje_dir>/responses``). How the judge is calibrated depends on the
number of oracle labels in the logged data (the base policy's calibration set):

* 10 or more: ``cje.analyze_dataset`` as documented (5-fold cross-fitted calibration);
* 4 to 9: analyze_dataset stops ("Too few oracle samples ... for 5-fold CV"), so this script
  runs its steps itself with max(2, labels // 2) folds, the rule CJE 0.3's Direct mode and
  CJE 0.9 apply to the same counts;
* fewer than 4: no calibration; the raw judge score is the reward ("uncalibrated").

It prints one JSON object (the mode, policies, estimates, standard errors) on stdout, says on
stderr when it had to leave the documented path, and exits 1 if any target policy lacks a finite
estimate. The held-out validation labels (``<cje_dir>/validation/``) are never read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from pathlib import Path

ESTIMATORS = {"calibrated-ips": False, "dr-cpo": True}   # estimator -> uses the fresh draws
FULL_LABELS = 10        # 2 labels per fold for analyze_dataset's 5 folds
MIN_LABELS = 4          # below this CJE cannot fit a cross-fitted calibration at all


def calibration_mode(n_labels: int) -> tuple[str, int | None]:
    """("full" | "reduced_folds" | "uncalibrated", folds), the names stage 5's report uses."""
    if n_labels >= FULL_LABELS:
        return "full", 5
    if n_labels >= MIN_LABELS:
        return "reduced_folds", max(2, n_labels // 2)
    return "uncalibrated", None


def estimate(cje, dataset, logged: Path, fresh: Path, name: str, mode: str, folds: int | None):
    """CJE's result for one estimator: through analyze_dataset when it can run, otherwise through
    the same steps (calibrate, sampler, estimator, fresh draws) with the calibration we can fit."""
    if mode == "full":
        kwargs = {"fresh_draws_dir": str(fresh)} if ESTIMATORS[name] else {}
        return cje.analyze_dataset(logged_data_path=str(logged), estimator=name, **kwargs)
    from cje.calibration import calibrate_dataset
    from cje.data.fresh_draws import load_fresh_draws_auto
    from cje.data.precomputed_sampler import PrecomputedSampler
    from cje.interface.factory import create_estimator

    if mode == "reduced_folds":
        rewarded, calibration = calibrate_dataset(dataset, judge_field="judge_score", oracle_field="oracle_label",
                                                  enable_cross_fit=True, n_folds=folds)
    else:
        rewarded = dataset.model_copy(update={"samples": [s.model_copy(update={"reward": s.judge_score})
                                                          for s in dataset.samples]})
        calibration = None
    sampler = PrecomputedSampler(rewarded)
    estimator = create_estimator(name, sampler, {}, calibration, False)
    if ESTIMATORS[name]:
        for policy in sampler.target_policies:
            estimator.add_fresh_draws(policy, load_fresh_draws_auto(fresh, policy, verbose=False))
    result = estimator.fit_and_estimate()
    result.metadata.setdefault("target_policies", list(sampler.target_policies))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cje_dir", help="the export folder: <data_dir>/cje")
    p.add_argument("--estimator", action="append", choices=sorted(ESTIMATORS),
                   help="run only these (default: all)")
    p.add_argument("--verbose", action="store_true", help="show CJE's own log and warnings")
    args = p.parse_args()
    if not args.verbose:
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")

    import cje

    logged = Path(args.cje_dir) / "logged_data.jsonl"
    fresh = Path(args.cje_dir) / "responses"
    dataset = cje.load_dataset_from_jsonl(str(logged))
    n_oracle = sum(s.oracle_label is not None for s in dataset.samples)
    mode, folds = calibration_mode(n_oracle)
    if mode == "reduced_folds":
        print(f"cje_roundtrip: oracle labels in {logged}: {n_oracle}, too few for analyze_dataset's 5-fold "
              f"calibration (needs {FULL_LABELS}); calibrating with {folds} folds", file=sys.stderr)
    elif mode == "uncalibrated":
        print(f"cje_roundtrip: oracle labels in {logged}: {n_oracle}, too few to calibrate the judge "
              f"(needs {MIN_LABELS}); estimates use the raw judge score as the reward", file=sys.stderr)
    out = {"cje_version": cje.__version__, "n_samples": dataset.n_samples,
           "target_policies": list(dataset.target_policies), "n_oracle": n_oracle,
           "calibration": {"mode": mode, "folds": folds}, "estimates": {}}
    ok = True
    for name in args.estimator or list(ESTIMATORS):
        result = estimate(cje, dataset, logged, fresh, name, mode, folds)
        policies = list(result.metadata.get("target_policies", dataset.target_policies))
        per = {}
        for i, pol in enumerate(policies):
            est, se = float(result.estimates[i]), float(result.standard_errors[i])
            per[pol] = {"estimate": est if math.isfinite(est) else None,
                        "standard_error": se if math.isfinite(se) else None}
            ok &= math.isfinite(est)
        missing = set(dataset.target_policies) - set(policies)
        ok &= not missing
        out["estimates"][name] = per
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
