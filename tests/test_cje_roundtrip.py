"""The CJE export, read by the real cje-eval 0.3: every target policy gets a finite estimate.

cje-eval 0.3.0 pins numpy<2.1 and pandas<3, which clash with this project, so it is installed
once into its own venv under ~/.cache/ope_prep (scripts/cje_env.py; needs PyPI the first time,
about a minute) and driven through scripts/cje_roundtrip.py in a subprocess. That script runs
``cje.load_dataset_from_jsonl``, then ``cje.analyze_dataset`` with the calibrated IPS estimator
(logged data only) and with the doubly robust DR-CPO estimator (logged data + fresh draws).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_run import BASE, PROJECT_DIR, TARGETS, make_run  # noqa: E402

sys.path.insert(0, str(PROJECT_DIR / "scripts"))
import cje_env  # noqa: E402

from ope_prep.config import load_config  # noqa: E402
from ope_prep.stages import summarize  # noqa: E402


def test_cje_03_reads_the_export_and_estimates_every_target(tmp_path):
    n = 80
    run = make_run(tmp_path, n=n, seed=3)
    config = load_config(run.config_path)
    summarize.run(config, argparse.Namespace(config=str(run.config_path), force=False), {})
    n_calibration = sum(o["policy"] == BASE for o in run.rows["oracle_labels.jsonl"])

    python = cje_env.ensure(quiet=True)
    p = subprocess.run([str(python), str(PROJECT_DIR / "scripts" / "cje_roundtrip.py"),
                        str(run.data_dir / "cje")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["cje_version"] == cje_env.CJE_VERSION
    assert out["n_samples"] == n
    assert out["n_oracle"] == n_calibration
    assert sorted(out["target_policies"]) == sorted(TARGETS)
    assert set(out["estimates"]) == {"calibrated-ips", "dr-cpo"}
    for estimator, per_policy in out["estimates"].items():
        assert sorted(per_policy) == sorted(TARGETS), estimator
        for policy, est in per_policy.items():
            assert est["estimate"] is not None and math.isfinite(est["estimate"]), (estimator, policy)
            assert 0.0 <= est["estimate"] <= 1.0, (estimator, policy, est)
