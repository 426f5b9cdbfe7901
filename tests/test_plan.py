"""run_pipeline.py N --plan: counts from the real sample, API cost from the config's prices, local
time from a real probe in a scratch directory; nothing written in the data directory."""

from __future__ import annotations

import re

from conftest import run_script, small_config, write_config


def test_plan_counts_costs_and_probes_without_writing(tmp_path):
    cfg = small_config(tmp_path / "data")
    prices = {"usd_per_1k_input_tokens": 0.5, "usd_per_1k_output_tokens": 2.0}
    cfg["judge"] = {"provider": "openai", "model": "judge-model", "api_key_env": "OPE_PLAN_KEY",
                    "base_url": "http://127.0.0.1:9/v1", "max_tokens": 2, **prices}
    path = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "40", "--plan", "--config", str(path), env={"OPE_PLAN_KEY": "sk-test"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Prompts: sharegpt 30, nq_open 5, healthsearchqa 5" in out
    assert "Stage 2: 160 generations (4 policies)" in out and "generated tokens <= 1,920" in out
    assert "Stage 2b: 200 teacher-forced sequences" in out
    judge = re.search(r"Stage 3 judge: 160 calls to judge-model; <= ([\d,]+) input tokens, ([\d,]+) output "
                      r"tokens; <= \$([\d.,]+)", out)
    assert judge, out
    tokens_in, tokens_out, cost = (float(x.replace(",", "")) for x in judge.groups())
    assert tokens_out == 160 * 2 and tokens_in > 160 * 500       # rubric, examples, prompt, response
    assert abs(cost - (tokens_in * 0.5 + tokens_out * 2.0) / 1000) < 0.01
    assert f"API cost: <= ${cost:,.2f}" in out
    # the probe ran the local stages for real, and stopped before the API judge: no money spent
    for stage in ("prepare", "generate", "logprobs"):
        assert re.search(rf"  {stage}: \d+ s", out), out
    assert "not probed: judge, oracle, summarize" in out
    assert not (tmp_path / "data").exists()
    assert not list(tmp_path.glob(".plan_probe_*"))
