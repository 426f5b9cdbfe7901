"""A run whose base policy is on a Q4_K_M model (llama.cpp's K-quant kernels), end to end: stage 5
passes with every policy's own responses equal to their sampling log-probabilities."""

from __future__ import annotations

import json

from conftest import ROOT, run_script, small_config, write_config
from ope_prep.requantize import requantized


def test_p0_on_q4_k_m_runs_end_to_end_with_every_self_check_exact(tmp_path):
    cfg = small_config(tmp_path / "data")
    cfg["models"]["smollm2_135m"]["path"] = str(requantized(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                                                             "Q4_K_M"))
    config = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "2", "--config", str(config), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    checks = info["checks"]
    assert set(checks["self_consistency"]) == {p["name"] for p in cfg["policies"]}
    for policy, c in checks["self_consistency"].items():
        assert c["n"] == 2 and c["max"] <= 1e-6, (policy, c)
    assert checks["tf_vs_sampling"]["n"] == 2 and checks["tf_vs_sampling"]["max"] <= 1e-6
    assert checks["clone"]["max_abs_log_weight"] <= 1e-9
    assert "Self-consistency" in (tmp_path / "data" / "report.md").read_text()
