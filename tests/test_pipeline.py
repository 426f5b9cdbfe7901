"""The whole pipeline on the embedded default (made small), with the real models and server:
a complete run, a rerun that computes nothing, resume after kill -9 inside stages 2 and 3,
and the refusal of a changed config with the documented way out."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import N, ROOT, run_script, small_config, write_config
from ope_prep import checkpoint
from ope_prep.backends.llama import load_tokenizer
from pipeline_harness import (comparable, computed_ok, done_keys, kill_group, records, run, start,
                              wait_for)


def test_complete_run_and_rerun_computes_nothing(reference):
    base, config, trace, proc = reference
    data = base / "data"
    for name in ["report.md", "dataset_info.json", "cje/logged_data.jsonl", "plots/judge_scores.png"]:
        assert (data / name).is_file(), name
    assert len(records(data / "responses.jsonl")) == N * 4
    assert len(records(data / "logprobs.jsonl")) == N * 4
    assert len(records(data / "judge_scores.jsonl")) == N * 4
    assert "=== [6/6] summarize" in proc.stdout and "Stage times" in proc.stdout
    # The run ends by saying what CJE can do with its calibration labels.
    assert proc.stdout.rstrip().splitlines()[-1].startswith("CJE: "), proc.stdout[-2000:]
    assert "calibration labels" in proc.stdout.rstrip().splitlines()[-1]
    logs = list((data / "logs").glob("run_*.log"))
    assert logs and "[generate]" in logs[0].read_text()
    # Every unit was computed exactly once.
    assert set(computed_ok(trace).values()) == {1}
    before = sum(computed_ok(trace).values())
    again = run(config, N, trace)
    assert again.returncode == 0, again.stdout[-2000:]
    assert again.stdout.count("already complete") == 6
    assert sum(computed_ok(trace).values()) == before


@pytest.mark.parametrize("stage_work", ["generate", "judge"])
def test_kill_9_inside_a_stage_then_resume_matches_uninterrupted(reference, tmp_path, stage_work):
    _, _, _, _ = reference
    config = write_config(tmp_path / "config.yaml", small_config(tmp_path / "data"))
    trace = tmp_path / "trace.tsv"
    work = tmp_path / "data" / "work" / f"{stage_work}.jsonl"

    def some_done():
        return work.exists() and len(done_keys(tmp_path / "data").get(stage_work, ())) >= 2

    proc = start(config, N, trace, log=tmp_path / "killed.log")
    assert wait_for(some_done, 600, proc), (tmp_path / "killed.log").read_text()[-3000:]
    kill_group(proc)
    durable = done_keys(tmp_path / "data")
    before = computed_ok(trace)
    assert durable[stage_work] and len(durable[stage_work]) < N * 4 or stage_work == "generate"

    resumed = run(config, N, trace)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = computed_ok(trace)
    # No unit that was durable at the kill was computed again.
    for work_name, keys in durable.items():
        for key in keys:
            assert after[(work_name, key)] == before[(work_name, key)] == 1, (work_name, key)
    # Same outputs as the uninterrupted run.
    ref = comparable(reference[0] / "data")
    got = comparable(tmp_path / "data")
    assert got == ref


def test_config_change_is_refused_with_keys_and_force_step_reruns_from_there(reference, tmp_path):
    src, _, _, _ = reference
    shutil.copytree(src / "data", tmp_path / "data")
    cfg = small_config(tmp_path / "data")
    config = write_config(tmp_path / "config.yaml", cfg)
    trace = tmp_path / "trace.tsv"
    same = run(config, N, trace)
    assert same.returncode == 0 and same.stdout.count("already complete") == 6

    cfg["policies"][0]["temperature"] = 0.9   # p0 and its clone move together
    cfg["policies"][1]["temperature"] = 0.9
    write_config(config, cfg)
    refused = run(config, N, trace)
    assert refused.returncode == 2
    assert "policies.p0.temperature: 0.7 -> 0.9" in refused.stdout
    # the way out, right to paste: the run's N and this config, not a 10,000-prompt run
    assert f"python run_pipeline.py {N} --config {config.resolve()} --force-step generate" in refused.stdout
    # A stage's partial work of the old config, found by the stage itself: the same command.
    checkpoint_file = checkpoint.checkpoint_path(tmp_path / "data")
    saved = checkpoint_file.read_bytes()
    checkpoint.forget(tmp_path / "data", ["generate"])
    partial = run_script("02_generate_responses.py", "--config", str(config))
    assert partial.returncode == 2, partial.stderr
    assert "holds partial work made with another config" in partial.stderr
    assert partial.stderr.strip().endswith(f"python run_pipeline.py {N} --config {config.resolve()} "
                                           "--force-step generate"), partial.stderr
    checkpoint_file.write_bytes(saved)

    forced = run(config, N, trace, "--force-step", "generate")
    assert forced.returncode == 0, forced.stdout[-3000:]
    responses = records(tmp_path / "data" / "responses.jsonl")
    old = records(src / "data" / "responses.jsonl")
    p0_new = [r for r in responses if r["policy"] == "p0"]
    p0_old = [r for r in old if r["policy"] == "p0"]
    assert [r["sampling_logprob"] for r in p0_new] != [r["sampling_logprob"] for r in p0_old]
    assert (tmp_path / "data" / "superseded").is_dir()
    # Nothing from the old config survives downstream: the export carries the new p0 logprobs.
    logged = records(tmp_path / "data" / "cje" / "logged_data.jsonl")
    new_tf = {r["prompt_id"]: r["logprob"] for r in records(tmp_path / "data" / "logprobs.jsonl")
              if r["policy"] == "p0"}
    assert all(abs(r["base_policy_logprob"] - new_tf[r["prompt_id"]]) < 1e-9 for r in logged)
    # p0's own response under p0 equals its sampling log-probability token by token (over the
    # prefix scored when a cut response meets Gemma's tokenizer).
    tf_p0 = {r["prompt_id"]: r for r in records(tmp_path / "data" / "logprobs.jsonl") if r["policy"] == "p0"}
    for r in p0_new:
        t = tf_p0[r["prompt_id"]]
        assert t["token_ids"] == r["token_ids"][:t["n_tokens"]]
        assert max((abs(a - b) for a, b in zip(t["token_logprobs"], r["token_logprobs"])), default=0) <= 1e-6

    # Changing only the judge reruns 3 and later, not 2.
    generated_before = sum(n for (w, _), n in computed_ok(trace).items() if w == "generate")
    judged_before = sum(n for (w, _), n in computed_ok(trace).items() if w == "judge")
    rubric = cfg["judge"]["rubric"]
    cfg["judge"]["rubric"] = "helpful_0_9"
    write_config(config, cfg)
    refused = run(config, N, trace)
    assert refused.returncode == 2 and f"judge.rubric: '{rubric}' -> 'helpful_0_9'" in refused.stdout
    assert "[generate] already complete" in refused.stdout
    forced = run(config, N, trace, "--force-step", "judge")
    assert forced.returncode == 0, forced.stdout[-3000:]
    assert "[generate] already complete" in forced.stdout
    assert "[logprobs] already complete" in forced.stdout
    assert sum(n for (w, _), n in computed_ok(trace).items() if w == "generate") == generated_before
    assert sum(n for (w, _), n in computed_ok(trace).items() if w == "judge") == judged_before + N * 4


def test_what_moves_a_log_probability_is_in_the_fingerprint(reference, tmp_path):
    """A chat template edited in the config, or a model file whose content changed (same name,
    same size), refuses the resume and names the key."""
    src, _, _, _ = reference
    shutil.copytree(src / "data", tmp_path / "data")
    model = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model.parent.mkdir()
    shutil.copyfile(ROOT / "models" / model.name, model)
    cfg = small_config(tmp_path / "data")
    cfg["models"]["smollm2_135m"]["path"] = str(model)
    config = write_config(tmp_path / "config.yaml", cfg)
    trace = tmp_path / "trace.tsv"
    same = run(config, N, trace)
    assert same.returncode == 0 and same.stdout.count("already complete") == 6, same.stdout[-2000:]

    edited = dict(cfg, models={**cfg["models"], "smollm2_135m": {
        **cfg["models"]["smollm2_135m"], "chat_template": load_tokenizer(str(model)).template_text + " "}})
    write_config(config, edited)
    refused = run(config, N, trace)
    assert refused.returncode == 2, refused.stdout[-2000:]
    assert "policies.p0.model_file.chat_template: None -> " in refused.stdout

    write_config(config, cfg)
    data = bytearray(model.read_bytes())
    data[-1000] ^= 1                         # one bit of the last tensor
    model.write_bytes(bytes(data))
    refused = run(config, N, trace)
    assert refused.returncode == 2, refused.stdout[-2000:]
    assert "policies.p0.model_file.sha256: " in refused.stdout


def test_stage_5_checks_every_target_record_against_the_base_event_across_tokenizers(reference, tmp_path):
    """On the real default run (pi_bigger_model on Gemma 3's tokenizer scores the text): the records
    pass as written; a target cut short (values still summing), a Gemma record with `complete`
    flipped and `scored_bytes` +17, a base text event without the split it sampled, and one whose
    values were all moved by the same amount (still summing) each fail, named (issues 24, 37)."""
    import json
    import math

    from ope_prep.config import load_config
    from ope_prep.validate import load_and_check
    src, _, _, _ = reference
    shutil.copytree(src / "data", tmp_path / "data")
    config = load_config(write_config(tmp_path / "config.yaml", small_config(tmp_path / "data")))
    _, checks, problems = load_and_check(config)
    events = checks["scored_events"]
    assert problems == [] and events["n"] == N * 4 and events["n_off"] == 0
    assert events["text_events"]["n"] == 2 * N and events["text_events"]["tokenizers_differ"] == ["gemma3_270m"]

    path = tmp_path / "data" / "logprobs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bad = next(r for r in rows if r["policy"] == "pi_bad" and r["n_tokens"] > 2)
    keep = bad["n_tokens"] // 2
    bad.update(token_ids=bad["token_ids"][:keep], token_logprobs=bad["token_logprobs"][:keep], n_tokens=keep)
    bad["logprob"] = math.fsum(bad["token_logprobs"])
    big = next(r for r in rows if r["policy"] == "pi_bigger_model" and r["prompt_id"] != bad["prompt_id"])
    assert big["event"] == "text"
    big["complete"] = not big["complete"]
    big["scored_bytes"] += 17
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, _, problems = load_and_check(config)
    assert len(problems) == 1 and "records do not score the event of p0's response" in problems[0], problems
    assert f"{bad['prompt_id']}/pi_bad: {keep} tokens scored, the event has" in problems[0]
    assert f"{big['prompt_id']}/pi_bigger_model: scored_bytes" in problems[0]
    assert f"complete {big['complete']}, the event's {not big['complete']}" in problems[0]

    # The base's text events: one without the split p0 sampled, one moved by +0.5 nat throughout.
    path.write_text((src / "data" / "logprobs.jsonl").read_text())
    tpath = tmp_path / "data" / "base_text_logprobs.jsonl"
    texts = [json.loads(line) for line in tpath.read_text().splitlines()]
    dropped, moved = texts[0], texts[1]
    responses = {(r["prompt_id"], r["policy"]): r for r in map(json.loads, (src / "data" / "responses.jsonl").read_text().splitlines())}
    sampled = responses[(dropped["prompt_id"], "p0")]["token_ids"]
    sampled = sampled[:-1] if responses[(dropped["prompt_id"], "p0")]["finish_reason"] == "stop" else sampled
    assert sampled in dropped["paths"]
    other = [p for p in dropped["paths"] if p != sampled] or [config_spelling(sampled)]
    dropped.update(paths=other[:1], path_logprobs=[dropped["logprob"]], crossing_logprob=None)
    moved.update(logprob=moved["logprob"] - 0.5, path_logprobs=[v - 0.5 for v in moved["path_logprobs"]],
                 crossing_logprob=None if moved["crossing_logprob"] is None else moved["crossing_logprob"] - 0.5)
    tpath.write_text("".join(json.dumps(r) + "\n" for r in texts))
    _, _, problems = load_and_check(config)
    assert any(f"{dropped['prompt_id']}/p0: " in p and "the split the base sampled is not among its paths" in p
               for p in problems), problems
    assert any("value the split it sampled otherwise than its token-sequence record" in p
               and f"{moved['prompt_id']}/p0" in p for p in problems), problems


def config_spelling(tokens: list[int]) -> list[int]:
    """Another spelling of the same text (the tokens with the first split in two), for a path
    that is not the sampled one."""
    return tokens[1:]


def test_overlap_is_known_after_stage_2b_and_stop_mode_refuses_the_judge_before_paying(reference, tmp_path):
    src, _, _, proc = reference
    out = proc.stdout
    cfg = small_config(tmp_path / "data")
    targets = [p["name"] for p in cfg["policies"] if p["name"] != cfg["base_policy"]]
    # In the default run's log: each target's overlap figures, after 2b and before stage 3.
    at = out.index(f"[logprobs] overlap with {cfg['base_policy']}'s responses, before any judge or oracle call")
    assert at < out.index("=== [4/6] judge")
    figures = json.loads((src / "data" / "overlap.json").read_text())["targets"]
    assert sorted(figures) == sorted(targets)
    for t in targets:
        assert f"[logprobs]   {t}" in out[at:out.index("=== [4/6] judge")]
        assert figures[t]["n"] == N
    clone = figures[cfg["clone_policy"]]
    assert clone["ess_fraction"] > 0.999 and abs(clone["log_weight"]["max"]) < 1e-3
    # The report says the same figures, and what they mean.
    report = (src / "data" / "report.md").read_text()
    assert "typicality coverage" in report and "how many of the n prompts the estimate effectively rests on" in report

    # Stop mode, with limits no real target meets: the judge refuses before any call.
    shutil.copytree(src / "data", tmp_path / "data")
    checkpoint.forget(tmp_path / "data", ["judge", "oracle", "summarize"])
    for work in (tmp_path / "data" / "work").glob("judge*"):
        work.unlink()
    cfg["validation"] = {"on_low_overlap": "stop", "min_ess_fraction": 0.9999}
    config = write_config(tmp_path / "config.yaml", cfg)
    refused = run_script("03_judge_scores.py", "--config", str(config))
    assert refused.returncode == 3, refused.stdout + refused.stderr
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stage judge not started, nothing paid: ")
    low = [t for t in targets if t != cfg["clone_policy"]]
    assert all(f"{t}: effective sample size" in message for t in low), message
    assert cfg["clone_policy"] + ":" not in message
    assert f"validation.on_low_overlap: warn in {config.resolve()}" in message
    assert not list((tmp_path / "data" / "work").glob("judge*")) or \
        not done_keys(tmp_path / "data").get("judge")


def test_an_interrupted_force_step_resumes_with_the_printed_command(reference, tmp_path):
    """Ctrl-C in a `--force-step judge` redo, at a named point (its first durable judge batch):
    the runner prints the command that resumes; that command keeps what the redo finished (no
    judge unit computed twice, the earlier work and request cache moved aside once), and a
    forced redo begun after that one ended moves the work aside again."""
    src, _, _, _ = reference
    shutil.copytree(src / "data", tmp_path / "data")
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", small_config(data))
    trace = tmp_path / "trace.tsv"
    paused = tmp_path / "paused"
    proc = start(config, N, trace, "--force-step", "judge", log=tmp_path / "forced.log",
                 env={"OPE_PREP_PAUSE_AFTER_SAVE": f"judge:{paused}"})
    assert wait_for(paused.exists, 600, proc), (tmp_path / "forced.log").read_text()[-3000:]
    saved = done_keys(data)["judge"]
    assert 0 < len(saved) < N * 4
    os.killpg(proc.pid, signal.SIGINT)                 # Ctrl-C: the runner and its stage
    assert proc.wait(timeout=300) == 130
    out = (tmp_path / "forced.log").read_text()
    resume = out.split("Resume with: ")[-1].splitlines()[0]
    assert resume == f"python run_pipeline.py {N} --config {config.resolve()} --force-step judge", out[-2000:]

    def paste(command: str) -> subprocess.CompletedProcess:     # the printed command, as a user would
        return subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, capture_output=True,
                              text=True, timeout=900, env={**os.environ, "OPE_PREP_TRACE": str(trace)})

    resumed = paste(resume)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[judge] resuming the forced redo" in resumed.stdout
    judged = {k: n for (w, k), n in computed_ok(trace).items() if w == "judge"}
    assert set(judged.values()) == {1} and len(judged) == N * 4, judged
    assert len(list((data / "superseded").glob("*-judge"))) == 1
    assert len(list((data / "superseded").glob("*-oracle"))) == 1
    assert records(data / "judge_scores.jsonl") == records(src / "data" / "judge_scores.jsonl")
    assert "redo" not in checkpoint.load(data)       # the redo ended with the run

    again = paste(resume)                             # a new redo: asked anew
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resuming the forced redo" not in again.stdout
    assert {n for (w, _), n in computed_ok(trace).items() if w == "judge"} == {2}


def test_a_stage_run_by_hand_refuses_outputs_of_an_upstream_that_changed_since(reference, tmp_path):
    """Issue 37's sequence: pi_bad's system prompt changed, stages 2 and 2b redone by hand with
    --force, 3 and 4 skipped: stage 5 (and 4) refuse with one line naming the stage to update;
    updating 3 and 4 by hand rescores only pi_bad's new responses, and stage 5 then passes with
    every score and label carrying the digest of the response it scored."""
    from ope_prep.records import scored_digest
    src, _, _, _ = reference
    shutil.copytree(src / "data", tmp_path / "data")
    data = tmp_path / "data"
    cfg = small_config(data)
    next(p for p in cfg["policies"] if p["name"] == "pi_bad")["system_prompt"] = "Answer in one vague word."
    config = write_config(tmp_path / "config.yaml", cfg)
    trace = tmp_path / "trace.tsv"

    def script(name, *extra):
        return run_script(name, "--config", str(config), *extra, env={"OPE_PREP_TRACE": str(trace)})

    for name in ("02_generate_responses.py", "02b_compute_logprobs.py"):
        done = script(name, "--force")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("05_validate_and_summarize.py", "04_oracle_labels.py"):
        refused = script(name)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: stage judge is out of date: generate/responses.jsonl"), lines
        assert f"python 03_judge_scores.py --config {config.resolve()}" in lines[0]

    judged = script("03_judge_scores.py")
    assert judged.returncode == 0, judged.stdout[-2000:] + judged.stderr[-2000:]
    rescored = [k for w, k, s in (l.split("\t") for l in trace.read_text().splitlines()) if w == "judge"]
    assert sorted(rescored) == sorted(f"{pid}/pi_bad" for pid in {r["prompt_id"] for r in records(data / "prompts.jsonl")})
    refused = script("05_validate_and_summarize.py")
    assert refused.returncode == 2 and "error: stage oracle is out of date" in refused.stderr, refused.stderr
    for name in ("04_oracle_labels.py", "05_validate_and_summarize.py"):
        done = script(name)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    prompts = {r["prompt_id"]: r["prompt"] for r in records(data / "prompts.jsonl")}
    responses = {(r["prompt_id"], r["policy"]): r["response"] for r in records(data / "responses.jsonl")}
    for name in ("judge_scores.jsonl", "oracle_labels.jsonl"):
        for r in records(data / name):
            key = (r["prompt_id"], r["policy"])
            assert r["input_digest"] == scored_digest(prompts[key[0]], responses[key]), (name, key)
