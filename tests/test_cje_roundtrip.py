"""The CJE export, read by the real cje-eval 0.3 and 0.9: every policy gets a finite estimate.

cje-eval 0.3.0 pins numpy<2.1 and pandas<3, which clash with this project, so it is installed
once into its own venv under ~/.cache/ope_prep (scripts/cje_env.py; needs PyPI the first time,
about a minute) and driven through scripts/cje_roundtrip.py in a subprocess. That script runs
``cje.load_dataset_from_jsonl``, then the calibrated IPS estimator (logged data only) and the
doubly robust DR-CPO estimator (logged data + fresh draws): through ``cje.analyze_dataset`` from
10 calibration labels, with fewer folds or uncalibrated below.

cje-eval 0.9 (Direct mode, the test extra of pyproject.toml) runs in this environment: its real ``cje analyze``
CLI, on the fresh draws with the logged data as calibration data and the held-out validation
labels as transport probes. Each CJE call takes under 10 s.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_run import BASE, POLICIES, PROJECT_DIR, TARGETS, make_run  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(PROJECT_DIR / "scripts"))
import cje_env  # noqa: E402

from ope_prep.config import load_config  # noqa: E402
from ope_prep.stages import summarize  # noqa: E402


def exported_run(tmp_path, n: int):
    """A synthetic run of n prompts through the real stage 5; its number of calibration labels."""
    run = make_run(tmp_path, n=n, seed=3)
    config = load_config(run.config_path)
    summarize.run(config, argparse.Namespace(config=str(run.config_path), force=False), {})
    return run, sum(o["policy"] == BASE for o in run.rows["oracle_labels.jsonl"])


def cje_03(run) -> tuple[dict, str]:
    """scripts/cje_roundtrip.py in the cje-eval 0.3 venv: its JSON and what it said on stderr."""
    python = cje_env.ensure(quiet=True)
    p = subprocess.run([str(python), str(PROJECT_DIR / "scripts" / "cje_roundtrip.py"),
                        str(run.data_dir / "cje")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout), p.stderr


def test_cje_03_reads_the_export_and_estimates_every_target(tmp_path):
    n = 80
    run, n_calibration = exported_run(tmp_path, n)
    assert n_calibration >= 10
    out, _ = cje_03(run)
    assert out["cje_version"] == cje_env.CJE_VERSION
    assert out["n_samples"] == n
    assert out["n_oracle"] == n_calibration
    assert out["calibration"] == {"mode": "full", "folds": 5}
    assert sorted(out["target_policies"]) == sorted(TARGETS)
    assert set(out["estimates"]) == {"calibrated-ips", "dr-cpo"}
    for estimator, per_policy in out["estimates"].items():
        assert sorted(per_policy) == sorted(TARGETS), estimator
        for policy, est in per_policy.items():
            assert est["estimate"] is not None and math.isfinite(est["estimate"]), (estimator, policy)
            assert 0.0 <= est["estimate"] <= 1.0, (estimator, policy, est)


@pytest.mark.parametrize("n, mode, folds", [(12, "uncalibrated", None), (24, "reduced_folds", 3)])
def test_cje_03_on_a_small_run_calibrates_what_it_can(tmp_path, n, mode, folds):
    """Under 10 calibration labels analyze_dataset stops; the round trip still estimates, and says how."""
    run, n_calibration = exported_run(tmp_path, n)
    assert n_calibration < 10
    info = json.loads((run.data_dir / "dataset_info.json").read_text())
    assert info["cje"]["calibration_labels"] == n_calibration
    assert info["cje"]["regime"] == mode
    out, said = cje_03(run)
    assert out["n_oracle"] == n_calibration
    assert out["calibration"] == {"mode": mode, "folds": folds}
    assert f"oracle labels in {run.data_dir / 'cje' / 'logged_data.jsonl'}: {n_calibration}, too few" in said
    for estimator, per_policy in out["estimates"].items():
        assert sorted(per_policy) == sorted(TARGETS), estimator
        assert all(math.isfinite(e["estimate"]) for e in per_policy.values()), (estimator, per_policy)


def cje_09(run, *extra: str) -> dict:
    cje_dir = run.data_dir / "cje"
    out = run.root / "cje09.json"
    p = subprocess.run([sys.executable, "-m", "cje", "analyze", str(cje_dir / "responses"), "--calibration-data",
                        str(cje_dir / "logged_data.jsonl"), "-o", str(out), "-q", *extra],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(out.read_text())


def test_cje_09_analyzes_the_export_with_held_out_labels_as_probes(tmp_path):
    run, n_calibration = exported_run(tmp_path, 24)
    validation = {t: sum(o["policy"] == t for o in run.rows["oracle_labels.jsonl"]) for t in TARGETS}
    probes = [a for t in TARGETS for a in ("--transport-probe", f"{t}={run.data_dir}/cje/validation/{t}.jsonl",
                                          "--transport-margin", f"{t}=0.1")]
    out = cje_09(run, *probes)
    meta = out["metadata"]
    assert meta["cje_version"] == "0.9.3"
    assert sorted(out["target_policies"]) == sorted(POLICIES)      # the base policy's draws too
    assert all(math.isfinite(e) and 0 <= e <= 1 for e in out["estimates"]), out["estimates"]
    assert meta["calibration_status"] == "CALIBRATED"
    # p0's labels enter once, through --calibration-data; no policy's draws carry labels of their own.
    assert meta["oracle_sources"]["calibration_data"]["n_oracle"] == n_calibration
    assert meta["oracle_sources"]["total_oracle"] == n_calibration
    assert meta["own_oracle_labels_by_policy"] == {p: 0 for p in POLICIES}
    # The held-out labels reach CJE only as probes: each target audited on exactly its labels.
    for t in TARGETS:
        assert meta["transport_audits"][t]["n_probe"] == validation[t], t
        assert meta["transport_audits"][t]["performed"], t


def test_cje_09_on_a_five_prompt_run_reports_uncalibrated_means(tmp_path):
    run, n_calibration = exported_run(tmp_path, 5)
    assert n_calibration < 4
    out = cje_09(run)
    assert out["metadata"]["calibration_status"] == "UNCALIBRATED"
    assert sorted(out["target_policies"]) == sorted(POLICIES)
    assert all(math.isfinite(e) for e in out["estimates"])
