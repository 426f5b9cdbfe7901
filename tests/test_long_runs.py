"""Multi-day runs on the real models: growing a finished run keeps every unit, rounds leave
validated snapshots that stage 5 and cje-eval 0.3 accept, a prompt too long for the judge is
passed over in stage 1, a quarantined prompt is left out (and too many stop the run before
scoring), --status reads a running run from another
process, and a stage that cannot finish its files on the disk does not start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter

from conftest import ROOT, run_script, small_config, write_config
from pipeline_harness import comparable, computed_ok, records, run, start, wait_for

from ope_prep.backends.llama import load_tokenizer
from ope_prep.rubrics import RUBRICS
from ope_prep.stages.oracle import labeled
from ope_prep.judging import judge_messages

sys.path.insert(0, str(ROOT / "scripts"))
import cje_env  # noqa: E402

POLICIES = ["p0", "pi_clone", "pi_bad", "pi_bigger_model"]


def new_units(trace) -> Counter:
    """Units computed, per work file."""
    return Counter(w for (w, _), n in computed_ok(trace).items() for _ in range(n))


def oracle_units(prompt_ids: list[str], seed: int = 42) -> int:
    return (sum(labeled(seed, 0.25, "oracle-calibration", pid) for pid in prompt_ids)
            + sum(labeled(seed, 0.25, "oracle-validation", pol, pid) for pid in prompt_ids for pol in POLICIES[1:]))


def test_grow_3_to_6_computes_only_the_new_units_and_back_to_3_computes_nothing(reference, tmp_path):
    ref_base = reference[0]
    shutil.copytree(ref_base / "data", tmp_path / "data")
    config = write_config(tmp_path / "config.yaml", small_config(tmp_path / "data"))
    trace = tmp_path / "trace.tsv"

    grown = run(config, 6, trace)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert "inputs changed (samples: 3 -> 6)" in grown.stdout
    prompts = [r["prompt_id"] for r in records(tmp_path / "data" / "prompts.jsonl")]
    old, new = prompts[:3], prompts[3:]
    assert old == [r["prompt_id"] for r in records(ref_base / "data" / "prompts.jsonl")]
    # Exactly the three new prompts' units, each once: nothing of the first three again.
    assert set(computed_ok(trace).values()) == {1}
    assert all(key.split("/")[0] in new or key.split("/")[1] in new for _, key in computed_ok(trace))
    counts = new_units(trace)
    assert counts["generate"] == 3 * 4 and counts["judge"] == 3 * 4
    assert counts["logprobs"] == 3 * 4 * 2 + 3                   # under every policy + self-checks + p0's text events
    assert counts["oracle_calibration"] + counts["oracle_validation"] == oracle_units(new)
    # The grown run's records of the first three prompts are the 3-prompt run's.
    for name in ["responses.jsonl", "logprobs.jsonl", "judge_scores.jsonl"]:
        ref = records(ref_base / "data" / name)
        assert [r for r in records(tmp_path / "data" / name) if r["prompt_id"] in old] == ref, name
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    assert info["run"]["n_prompts"] == 6 and info["checks"]["passed"]

    # Back to 3: the first three prompts, summarized again, exactly the 3-prompt run's outputs.
    before = sum(computed_ok(trace).values())
    shrunk = run(config, 3, trace)
    assert shrunk.returncode == 0, shrunk.stdout[-3000:] + shrunk.stderr[-3000:]
    assert sum(computed_ok(trace).values()) == before
    assert comparable(tmp_path / "data") == comparable(ref_base / "data")
    work = (tmp_path / "data" / "work" / "generate.jsonl").read_text().splitlines()
    assert len(work) == 1 + 6 * 4                                  # nothing deleted

    # Another seed is refused naming the flag, not the config.
    refused = run(config, 3, trace, "--seed", "7")
    assert refused.returncode == 2
    err = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--seed 7" in err[0] and "made with 42" in err[0], err
    assert "restore the config" not in err[0]
    # Another source is refused naming the key.
    write_config(config, small_config(tmp_path / "data", **{"source.max_prompt_chars": 500}))
    refused = run(config, 6, trace)
    assert refused.returncode == 2 and "source.max_prompt_chars: 600 -> 500" in refused.stderr + refused.stdout
    assert sum(computed_ok(trace).values()) == before


def test_rounds_leave_snapshots_that_stage_5_and_cje_03_accept_and_status_reads_the_run(tmp_path):
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", small_config(data, **{"run.first_round": 3}))
    trace = tmp_path / "trace.tsv"
    proc = start(config, 6, trace, log=tmp_path / "run.log")
    seen = []

    def status_shows_a_running_stage():
        p = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--status", "--config", str(config)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert p.returncode == 0, p.stdout + p.stderr
        seen.append(p.stdout)
        return "runner: running" in p.stdout and "round 2/2" in p.stdout and "judge" in p.stdout

    # Read from a second process while the run holds its lock (status takes none).
    assert wait_for(status_shows_a_running_stage, 900, proc, every=1.0), (
        seen[-1:], (tmp_path / "run.log").read_text()[-3000:])
    assert proc.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-3000:]
    last = seen[-1]
    assert "(6 prompts; rounds 3, 6)" in last and "latest snapshot: " + str(data / "snapshots" / "3_prompts") in last
    assert any(line.strip().startswith(("judge", "oracle")) and "done" in line for line in last.splitlines()), last
    assert "whole run to 6 prompts (all rounds): ETA" in last, last

    # Every unit once over both rounds, as many as a single pass.
    assert set(computed_ok(trace).values()) == {1}
    counts = new_units(trace)
    assert counts["generate"] == counts["judge"] == 6 * 4 and counts["logprobs"] == 6 * 4 * 2 + 6   # + p0's text events

    log = (tmp_path / "run.log").read_text()
    assert "rounds: 3, 6 prompts" in log and "round 1/2 done: 3 prompts" in log
    # After each stage, the runner says the whole run's ETA (all rounds, all unit stages).
    assert log.count("[runner] whole run to 6 prompts (all rounds): ") >= 8, log[-3000:]
    for n in (3, 6):
        snap = data / "snapshots" / f"{n}_prompts"
        info = json.loads((snap / "dataset_info.json").read_text())
        assert info["run"]["n_prompts"] == n and info["checks"]["passed"]
        assert len(records(snap / "responses.jsonl")) == n * 4
    # The first round's snapshot did not change when the second round rewrote the files.
    first = records(data / "snapshots" / "3_prompts" / "prompts.jsonl")
    assert first == records(data / "prompts.jsonl")[:3]

    # Stage 5 accepts the snapshot as a data directory of its own.
    snap_config = write_config(tmp_path / "snap.yaml", small_config(data / "snapshots" / "3_prompts"))
    p = run_script("05_validate_and_summarize.py", "--config", str(snap_config), "--force")
    assert p.returncode == 0 and "all checks passed" in p.stdout, p.stdout + p.stderr
    # And cje-eval 0.3 reads its export and estimates every target.
    python = cje_env.ensure(quiet=True)
    p = subprocess.run([str(python), str(ROOT / "scripts" / "cje_roundtrip.py"),
                        str(data / "snapshots" / "3_prompts" / "cje")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["n_samples"] == 3 and sorted(out["target_policies"]) == sorted(POLICIES[1:]), out
    for estimator, per_policy in out["estimates"].items():
        assert sorted(per_policy) == sorted(POLICIES[1:]), estimator


def judge_prompt_lengths(data, model_path, rubric_name: str, seed: int = 42) -> dict[str, int]:
    """Each prompt's judge prompt with an empty response, in the judge model's tokens."""
    tok = load_tokenizer(str(model_path))
    rubric = RUBRICS[rubric_name]
    return {r["prompt_id"]: len(tok.chat_tokens(judge_messages(rubric, r["prompt"], "", seed)))
            for r in records(data / "prompts.jsonl")}


def test_stage_1_leaves_out_a_prompt_too_long_for_the_judge_before_any_compute_is_spent(tmp_path):
    """Before: such a prompt was generated and teacher-forced under every policy, then its judge
    units were quarantined (always the longest prompts). Now stage 1 passes it over, says why in
    run.json, and the run completes with N prompts and nothing quarantined."""
    probe, data = tmp_path / "probe", tmp_path / "data"
    cfg = small_config(probe)
    # The judge: SmolLM2 with a context of its own, set below from the real judge prompts.
    cfg["models"]["judge_ctx"] = dict(cfg["models"]["smollm2_135m"])
    cfg["judge"]["model"] = "judge_ctx"
    run_script("01_prepare_data.py", "--config", str(write_config(tmp_path / "probe.yaml", cfg)),
               "--samples", "4", check=True)
    lengths = judge_prompt_lengths(probe, cfg["models"]["judge_ctx"]["path"], cfg["judge"]["rubric"])
    longest = max(lengths, key=lengths.get)
    need = {pid: n + cfg["generation"]["max_tokens"] + 1 for pid, n in lengths.items()}
    cfg["models"]["judge_ctx"]["n_ctx"] = need[longest] - 1     # every other prompt fits, this one not
    assert sorted(need.values())[-2] <= need[longest] - 1
    cfg["paths"]["data_dir"] = str(data)
    config = write_config(tmp_path / "config.yaml", cfg)

    p = run(config, 4, tmp_path / "trace.tsv")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    prompts = [r["prompt_id"] for r in records(data / "prompts.jsonl")]
    assert len(prompts) == 4 and longest not in prompts
    assert set(lengths) - {longest} <= set(prompts)
    skipped = json.loads((data / "run.json").read_text())["skipped"]
    reason = f"judge prompt + generation.max_tokens over models.judge_ctx.n_ctx ({need[longest] - 1})"
    assert sum(r.get(reason, 0) for r in skipped.values()) >= 1, skipped     # later candidates too
    assert not any((data / "quarantine").glob("*.jsonl")) or all(
        not records(q) for q in (data / "quarantine").glob("*.jsonl"))
    info = json.loads((data / "dataset_info.json").read_text())
    assert info["run"]["n_prompts"] == 4 and not info["run"]["excluded_prompts"]


def test_stage_1_drops_prompts_too_long_for_one_policy_model(tmp_path):
    data = tmp_path / "data"
    # the oracle on the other model: on gemma3_270m at 96 its own prompt would not fit either
    cfg = small_config(data, **{"models.gemma3_270m.n_ctx": 96, "source.max_prompt_chars": 2000,
                                "oracle.model": "smollm2_135m"})
    config = write_config(tmp_path / "config.yaml", cfg)
    p = run_script("01_prepare_data.py", "--config", str(config), "--samples", "8")
    assert p.returncode == 0, p.stdout + p.stderr
    skipped = json.loads((data / "run.json").read_text())["skipped"]     # per source: reason -> count
    reason = "prompt + generation.max_tokens over models.gemma3_270m.n_ctx (96)"
    assert sum(per_source.get(reason, 0) for per_source in skipped.values()) >= 1 and reason in p.stdout
    gemma = load_tokenizer(cfg["models"]["gemma3_270m"]["path"], cfg["models"]["gemma3_270m"]["chat_template"])
    system = next(x["system_prompt"] for x in cfg["policies"] if x["model"] == "gemma3_270m")
    for r in records(data / "prompts.jsonl"):
        assert len(gemma.prompt_tokens(system, r["prompt"])) + cfg["generation"]["max_tokens"] <= 96


def test_a_stage_that_cannot_finish_its_files_does_not_start(tmp_path):
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", small_config(data, **{"run.min_free_disk_mb": 10**9}))
    p = run(config, 3, tmp_path / "trace.tsv")
    assert p.returncode == 2, p.stdout + p.stderr
    err = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "MB free" in err[0] and "run.min_free_disk_mb" in err[0], err
    assert not (data / "prompts.jsonl").exists()


def test_status_without_a_run_and_while_stalled(tmp_path):
    """--status on an empty directory; a stage that saves nothing for a while is reported stalled."""
    from fault_proxy import ScriptedChatServer
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", small_config(data))
    p = run_script("run_pipeline.py", "--status", "--config", str(config))
    assert p.returncode == 0 and "no run here yet" in p.stdout and not data.exists()

    def hang(body):
        time.sleep(30)
        return "3"
    with ScriptedChatServer(hang) as stub:
        cfg = small_config(data, **{"run.stall_warning_minutes": 0.05, "judge.provider": "openai",
                                    "judge.base_url": stub.url + "/v1", "judge.api_key_env": "OPE_TEST_KEY",
                                    "judge.timeout_s": 60.0, "judge.concurrency": 1})
        write_config(config, cfg)
        proc = start(config, 3, tmp_path / "trace.tsv", log=tmp_path / "run.log", env={"OPE_TEST_KEY": "x"})
        try:
            assert wait_for(lambda: "stage judge has saved no unit for" in (tmp_path / "run.log").read_text(),
                            600, proc, every=0.5), (tmp_path / "run.log").read_text()[-3000:]
        finally:
            from pipeline_harness import kill_group
            kill_group(proc)


def test_the_runner_retries_transient_failures_and_quarantines_a_unit_that_never_parses(tmp_path):
    """Through the real openai client to a local server: the first request of each unit of one
    prompt gets HTTP 503 (transient: retried, then scored); every unit of another prompt gets an
    answer that cannot be read (deterministic: quarantined after run.quarantine_after tries).
    The runner reruns the judge stage by itself and the run completes without that prompt."""
    from fault_proxy import ScriptedChatServer
    data = tmp_path / "data"
    overrides = {"judge.rubric": "helpful_0_9_fewshot", "judge.provider": "openai", "judge.grammar": False,
                 "judge.max_tokens": 8, "judge.max_attempts": 1, "judge.concurrency": 1,
                 "judge.api_key_env": "OPE_TEST_KEY", "run.retry_wait_s": 0.2, "run.stage_attempts": 4,
                 "run.quarantine_after": 3, "validation.max_excluded_fraction": 0.5}
    config = write_config(tmp_path / "config.yaml", small_config(data, **overrides))
    env = {"OPE_TEST_KEY": "sk-test-x"}
    run_script("01_prepare_data.py", "--config", str(config), "--samples", "3", env=env, check=True)
    texts = [r["prompt"] for r in records(data / "prompts.jsonl")]
    asked: Counter = Counter()

    def answer(body):
        content = body["messages"][-1]["content"]
        asked[content] += 1
        if texts[0] in content:
            return "This response is quite good overall."
        if texts[1] in content and asked[content] == 1:
            return (503, "overloaded, try again")
        return "7"

    with ScriptedChatServer(answer) as stub:
        write_config(config, small_config(data, **overrides, **{"judge.base_url": stub.url + "/v1"}))
        p = run(config, 3, tmp_path / "trace.tsv", env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("[runner] stage judge ended with failed units; running it again") == 2
    first, second = records(data / "prompts.jsonl")[:2]
    quarantined = records(data / "quarantine" / "judge.jsonl")
    assert {q["prompt_id"] for q in quarantined} == {first["prompt_id"]} and len(quarantined) == 4
    assert all(q["tries"] == 3 and "unparsable judge output" in q["error"] for q in quarantined)
    # Asked three times each (then given up), the 503'd ones twice, the rest once.
    by_prompt = {i: sorted(n for c, n in asked.items() if t in c) for i, t in enumerate(texts)}
    assert by_prompt == {0: [3] * 4, 1: [2] * 4, 2: [1] * 4}, by_prompt
    scored = {(r["prompt_id"], r["policy"]) for r in records(data / "judge_scores.jsonl")}
    assert {pid for pid, _ in scored} == {second["prompt_id"], records(data / "prompts.jsonl")[2]["prompt_id"]}
    info = json.loads((data / "dataset_info.json").read_text())
    assert list(info["run"]["excluded_prompts"]) == [first["prompt_id"]]
    report = (data / "report.md").read_text()
    assert "**1 of 3 prompts are left out**" in report
    # What the left-out prompts have in common: reason, source, length.
    profile = info["run"]["excluded_profile"]
    assert (profile["n"], profile["of"]) == (1, 3)
    assert list(profile["by_reason"]) == [k for k in profile["by_reason"] if k.startswith("judge: unparsable judge output")]
    assert profile["by_source"][first["source"]]["left_out"] == 1
    assert sum(c["left_out"] + c["kept"] for c in profile["by_source"].values()) == 3
    assert profile["prompt_chars"]["left_out"]["max"] == len(first["prompt"])
    assert f"left out median {len(first['prompt'])} " in report and "| judge: unparsable judge output" in report

    # The default limit (1% of the prompts): stage 5 fails the run, naming the prompt, and a
    # scoring stage asked to run again refuses before it spends anything (exit 3).
    strict = small_config(data, **{**overrides, "judge.base_url": stub.url + "/v1",
                                   "validation.max_excluded_fraction": 0.01})
    write_config(config, strict)
    p = run(config, 3, tmp_path / "trace.tsv", "--force-step", "summarize", env=env)
    assert p.returncode == 1, p.stdout[-3000:]
    assert "1 of 3 prompts are left out" in p.stdout and first["prompt_id"] in p.stdout
    trace = tmp_path / "oracle_trace.tsv"
    p = run(config, 3, trace, "--force-step", "oracle", env=env)
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert "stage oracle not started, nothing paid: 1 of 3 prompts are left out" in p.stdout + p.stderr
    assert first["prompt_id"] in p.stdout + p.stderr
    assert not sum(computed_ok(trace).values())


def test_the_whole_run_eta_is_each_stage_left_at_its_own_busy_speed(tmp_path):
    """Judge units saved 1 s apart in two stretches 5,000 s apart (another stage ran between):
    23 units in 22 busy seconds. For 12 prompts, 24 judge units are left: 24 / (23/22) s = 23 s;
    the stages with no saved unit are named, not guessed."""
    from ope_prep.config import load_config
    from ope_prep.status import whole_run_eta
    data = tmp_path / "data"
    (data / "work").mkdir(parents=True)
    times = list(range(12)) + [5000 + t for t in range(12)]
    lines = ['{"_header": {}}'] + [json.dumps({"key": f"q{i}/p", "status": "ok", "t": t}) for i, t in enumerate(times)]
    (data / "work" / "judge.jsonl").write_text("\n".join(lines) + "\n")
    config = load_config(write_config(tmp_path / "config.yaml", small_config(data)))
    assert whole_run_eta(config, 12) == ("whole run to 12 prompts (all rounds): ETA over 23s (judge 23s; not "
                                         "measured yet: generate, logprobs, oracle)")
    assert whole_run_eta(config, 6) .endswith("ETA not known yet (not measured yet: generate, logprobs, oracle)")
