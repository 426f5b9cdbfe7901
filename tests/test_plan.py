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
    # at two sizes, fitted as start-up + per-prompt work, projected in the config's rounds
    assert "timed on 2 and 8 prompts, fitted as start-up + per-prompt work, and projected to 40 prompts" in out
    fitted = {m[0]: (float(m[1]), float(m[2])) for m in
              re.findall(r"  (\w+): (\d+) s start-up \+ ([\d.]+) s per prompt.* -> ", out)}
    assert list(fitted) == ["prepare", "generate", "logprobs"], out
    assert fitted["generate"][1] > 0 and fitted["logprobs"][1] > 0, "generating and teacher forcing take time per prompt"
    # 40 prompts in one round: every prompt's responses self-checked, timed apart
    assert re.search(r"  logprobs: .* \+ [\d.]+ s per self-check \(160 over the run\)", out), out
    assert "not probed: judge, oracle, summarize" in out
    assert not (tmp_path / "data").exists()
    assert not list(tmp_path.glob(".timing_probe_*"))


def test_the_projection_pays_start_up_per_round_and_whole_pass_stages_per_prompt_per_round():
    from ope_prep.timing import StageFit, StageTimes, fit, project
    fits = fit(2, StageTimes({"generate": 12.0, "summarize": 3.0}), 8, StageTimes({"generate": 30.0, "summarize": 3.6}))
    assert fits["generate"] == StageFit(fixed_s=6.0, per_prompt_s=3.0)
    assert abs(fits["summarize"].per_prompt_s - 0.1) < 1e-12
    rounds = [100, 200, 400, 1000]
    seconds = project(fits, rounds)
    assert seconds["generate"] == 4 * 6.0 + 3.0 * 1000
    assert abs(seconds["summarize"] - (4 * fits["summarize"].fixed_s + 0.1 * 1700)) < 1e-9
    assert fit(2, StageTimes({"x": 10.0}), 8, StageTimes({"x": 9.0}))["x"] == StageFit(fixed_s=9.0, per_prompt_s=0.0)
    # stage 2b's self-checks come off its line and are paid per self-check of the whole run
    tf = fit(2, StageTimes({"logprobs": 30.0}, self_check_s=8.0, self_check_units=8),
             8, StageTimes({"logprobs": 90.0}, self_check_s=32.0, self_check_units=32))["logprobs"]
    assert tf == StageFit(fixed_s=10.0, per_prompt_s=6.0, per_self_check_s=1.0)
    assert project({"logprobs": tf}, [100, 1000], self_checks=900) == {"logprobs": 2 * 10.0 + 6.0 * 1000 + 900}


def test_a_run_computes_each_chosen_self_check_once_over_its_rounds():
    from ope_prep.config import load_config
    from ope_prep.timing import self_checks_over_run
    config = load_config(None)
    policies = len(config.policies)
    assert self_checks_over_run(config, [150]) == 150 * policies          # all, up to 200
    one_pass = self_checks_over_run(config, [1000])
    assert one_pass == 200 * policies
    # the first 200 prompts of every round: rounds compute no more than one pass
    assert self_checks_over_run(config, [100, 200, 400, 1000]) == one_pass
