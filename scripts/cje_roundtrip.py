#!/usr/bin/env python
"""Load the CJE export with cje-eval 0.3 and estimate every target policy two ways.

Runs inside the cje-eval venv (scripts/cje_env.py prints its python); it imports only cje and
the standard library, never ope_prep:

    $(python scripts/cje_env.py) scripts/cje_roundtrip.py data/cje

It loads ``<cje_dir>/logged_data.jsonl`` with ``cje.load_dataset_from_jsonl``, then runs
``cje.analyze_dataset`` with the calibrated IPS estimator (logged data only) and with the
doubly robust DR-CPO estimator (logged data + the fresh draws in ``<cje_dir>/responses``).
It prints one JSON object (policies, estimates, standard errors) on stdout and exits 1 if any
target policy lacks a finite estimate.
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
    out = {"cje_version": cje.__version__, "n_samples": dataset.n_samples,
           "target_policies": list(dataset.target_policies),
           "n_oracle": sum(s.oracle_label is not None for s in dataset.samples),
           "estimates": {}}
    ok = True
    for name in args.estimator or list(ESTIMATORS):
        kwargs = {"fresh_draws_dir": str(fresh)} if ESTIMATORS[name] else {}
        result = cje.analyze_dataset(logged_data_path=str(logged), estimator=name, **kwargs)
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
