"""Runs that must not mix or stop (issue 24, item 6): one lock for the whole runner, torn headers
repaired, a forced redo asking the API again without forgetting what was paid, and the bad inputs
that used to be a traceback or a rename of the wrong folder: one line, exit 2, nothing written.

Real processes throughout; the API judge is a scripted server on 127.0.0.1 (tests/fault_proxy.py),
the data dirs of stages 1-2b are written by hand as in test_judge_oracle.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import ROOT, run_script, small_config, write_config
from fault_proxy import ScriptedChatServer
from pipeline_harness import kill_group, start, wait_for
from test_judge_oracle import N_UNITS, api_overrides, make_data, records, rows, run
from ope_prep import checkpoint
from ope_prep.backends.request_cache import ledger_total
from ope_prep.config import load_config
from ope_prep.files import DATA_DIR_MARKER
from ope_prep.pipeline import fresh_refusal

USD_PER_REPLY = (50 + 1) / 1000     # the scripted server's usage: 50 prompt tokens, one answer token


def error_lines(proc) -> list[str]:
    return [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("error:")]


def assert_one_line_exit_2(proc, *expect: str) -> str:
    out = proc.stdout + proc.stderr
    lines = error_lines(proc)
    assert proc.returncode == 2, out
    assert len(lines) == 1 and "Traceback" not in out, out
    for text in expect:
        assert text in lines[0], lines[0]
    return lines[0]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. one lock for the whole runner ------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_runner_holds_the_lock_between_stages_a_second_runner_or_stage_is_refused(tmp_path):
    cfg_path = write_config(tmp_path / "config.yaml", small_config(tmp_path / "data"))
    data = tmp_path / "data"
    runner = start(cfg_path, 2, tmp_path / "trace.tsv", log=tmp_path / "runner.log")
    try:
        # Stop the runner while its stage 1 runs, and let stage 1 finish: the run is now
        # between stages 1 and 2, as deterministically as it can be.
        assert wait_for(lambda: _children(runner.pid), 120, runner), (tmp_path / "runner.log").read_text()
        os.kill(runner.pid, signal.SIGSTOP)
        stage1 = _children(runner.pid)
        assert stage1
        assert wait_for(lambda: _exited(stage1[0]), 300), "stage 1 did not finish"
        # The stage the runner started ran under the runner's lock.
        assert "prepare" in checkpoint.load(data)["stages"], (tmp_path / "runner.log").read_text()
        before = files_of(data)
        prompts = (data / "prompts.jsonl").read_bytes()

        # A stage run by hand: refused, one line, exit 2; before, it rewrote prompts.jsonl for 3 prompts.
        hand = run_script("01_prepare_data.py", "--config", str(cfg_path), "--samples", "3")
        assert_one_line_exit_2(hand, "is in use by another pipeline process", str(data))
        # A second runner, and one with --fresh (which renamed the data dir from under the first).
        second = run_script("run_pipeline.py", "3", "--config", str(cfg_path))
        assert_one_line_exit_2(second, "is in use by another pipeline process")
        fresh = run_script("run_pipeline.py", "2", "--config", str(cfg_path), "--fresh")
        assert_one_line_exit_2(fresh, "is in use by another pipeline process")

        assert files_of(data) == before and (data / "prompts.jsonl").read_bytes() == prompts
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("data")] == ["data"]
    finally:
        kill_group(runner)
    # The lock goes with the runner: a stage can run again.
    again = run_script("01_prepare_data.py", "--config", str(cfg_path), "--samples", "2")
    assert again.returncode == 0, again.stdout + again.stderr


# ---- 2. torn headers -------------------------------------------------------------------------

def _seven(body):
    return "7"


@pytest.mark.parametrize("which", ["work/judge.jsonl", "cache/judge_api_cache.jsonl"])
def test_torn_header_is_started_again_not_a_refusal(tmp_path, which):
    with ScriptedChatServer(_seven) as stub:
        path = make_data(tmp_path, **api_overrides("judge", stub.url + "/v1", grammar=False, max_tokens=8))
        data = tmp_path / "data"
        torn = data / which
        torn.parent.mkdir(parents=True, exist_ok=True)
        torn.write_bytes(b'{"_header":{"fingerprint":{"ca')      # a kill while the header was written
        p = run("03_judge_scores.py", path)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "header was torn or damaged" in p.stderr
        assert len(records(data / "judge_scores.jsonl")) == N_UNITS
        assert json.loads(torn.read_text().splitlines()[0])["_header"]


def test_damaged_header_of_a_work_file_moves_it_aside_and_recomputes(tmp_path):
    with ScriptedChatServer(_seven) as stub:
        path = make_data(tmp_path, **api_overrides("judge", stub.url + "/v1", grammar=False, max_tokens=8))
        data = tmp_path / "data"
        work = data / "work" / "judge.jsonl"
        work.parent.mkdir(parents=True)
        work.write_text('{"_head\x00\x00\n{"key": "q1/p0", "status": "ok", "record": {}}\n')
        p = run("03_judge_scores.py", path)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "header was torn or damaged" in p.stderr and "recomputed" in p.stderr
        assert len(list(work.parent.glob("judge.jsonl.bad-header-*"))) == 1     # kept, not deleted
        assert len(records(data / "judge_scores.jsonl")) == N_UNITS and stub.counts["requests"] == N_UNITS


def test_damaged_cache_header_keeps_the_replies_and_the_spend_ledger(tmp_path):
    answers = {"mode": "prose"}

    def answer(body):
        if answers["mode"] == "prose" and "primary color" in body["messages"][-1]["content"]:
            return "This response is quite good overall."
        return "7"

    with ScriptedChatServer(answer) as stub:
        prices = dict(usd_per_1k_input_tokens=1.0, usd_per_1k_output_tokens=1.0, budget_usd=100.0)
        path = make_data(tmp_path, **api_overrides("judge", stub.url + "/v1", grammar=False, max_tokens=8, **prices))
        data = tmp_path / "data"
        p = run("03_judge_scores.py", path)
        assert p.returncode == 1, p.stdout + p.stderr            # the prose answers: failed units
        failed = [r for r in rows(data / "work" / "judge.jsonl") if r["status"] == "failed"]
        assert failed and stub.counts["requests"] == N_UNITS
        cache = data / "cache" / "judge_api_cache.jsonl"
        paid = ledger_total(cache)
        assert paid > 0
        lines = cache.read_text().splitlines()
        cache.write_text("\n".join(['{"_header": {"finger'] + lines[1:]) + "\n")   # header damaged
        answers["mode"] = "digits"
        p = run("03_judge_scores.py", path)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "header was torn or damaged" in p.stderr and "keeping its" in p.stderr
        # the usable replies came from the kept cache; only the failed units were asked again
        assert stub.counts["requests"] == N_UNITS + len(failed)
        assert ledger_total(cache) == pytest.approx(paid + len(failed) * USD_PER_REPLY)
        notes = json.loads((data / "judge_usage.json").read_text())["notes"]
        assert f"${paid + len(failed) * USD_PER_REPLY:.6f}" in notes, notes


# ---- 3. a forced redo asks again, and what was paid still counts ------------------------------

def test_forced_redo_of_an_api_judge_asks_again_and_the_spend_still_counts(tmp_path):
    answers = {"digit": "7"}
    with ScriptedChatServer(lambda body: answers["digit"]) as stub:
        prices = dict(usd_per_1k_input_tokens=1.0, usd_per_1k_output_tokens=1.0)
        overrides = api_overrides("judge", stub.url + "/v1", grammar=False, max_tokens=8, budget_usd=100.0, **prices)
        path = make_data(tmp_path, **overrides)
        data = tmp_path / "data"
        p = run("03_judge_scores.py", path)
        assert p.returncode == 0, p.stdout + p.stderr
        paid = N_UNITS * USD_PER_REPLY
        assert ledger_total(data / "cache" / "judge_api_cache.jsonl") == pytest.approx(paid)

        # The API judge changed. A forced redo under a budget below what was already paid: the
        # spend of the superseded replies still counts, so not one request is sent.
        answers["digit"] = "3"
        write_config(path, small_config(data, **{**overrides, "judge.budget_usd": paid / 2, "judge.rubric":
                                                 "helpful_0_9_fewshot", "oracle.rubric": "helpful_0_9_fewshot"}))
        p = run("03_judge_scores.py", path, "--force")
        assert p.returncode == 3, p.stdout + p.stderr
        assert "budget_usd" in p.stderr and stub.counts["requests"] == N_UNITS
        moved = list((data / "superseded").glob("*-judge/cache/judge_api_cache.jsonl"))
        assert len(moved) == 1 and ledger_total(moved[0]) == pytest.approx(paid)

        # With room in the budget (and no --force: the runner retries without it), every unit is
        # asked again: the new judge's scores, none from the old replies.
        write_config(path, small_config(data, **{**overrides, "judge.rubric": "helpful_0_9_fewshot",
                                                 "oracle.rubric": "helpful_0_9_fewshot"}))
        p = run("03_judge_scores.py", path)
        assert p.returncode == 0, p.stdout + p.stderr
        assert stub.counts["requests"] == 2 * N_UNITS
        assert all(s["score"] == 3 / 9 for s in records(data / "judge_scores.jsonl"))
        assert ledger_total(data / "cache" / "judge_api_cache.jsonl") == pytest.approx(2 * paid)
        notes = json.loads((data / "judge_usage.json").read_text())["notes"]
        assert f"${2 * paid:.6f}" in notes, notes


# ---- 4-6. bad input: one line, exit 2, nothing written -----------------------------------------

def _nothing_written(data: Path) -> None:
    written = [p for p in data.rglob("*") if p.is_file() and "logs" not in p.parts
               and p.name not in (".lock", DATA_DIR_MARKER)] if data.exists() else []
    assert written == [], written


@pytest.mark.parametrize("template,expect", [
    ("{% if %}x{% endif %}", "Jinja syntax error at line 1"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ raise_exception('no system role') }}",
     "fails when rendered: UndefinedError"),
    ("{{ messages[0]['content'] | no_such_filter }}", "Jinja syntax error"),
    ("{{ messages[0].content.nope.deeper }}", "fails when rendered: UndefinedError"),
])
def test_broken_chat_template_is_one_line_exit_2_not_a_traceback(tmp_path, template, expect):
    cfg = small_config(tmp_path / "data")
    cfg["models"]["gemma3_270m"]["chat_template"] = template
    path = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "2", "--config", str(path))
    assert_one_line_exit_2(proc, "models.gemma3_270m.chat_template", expect, str(path))
    assert "attempt 2" not in proc.stdout           # not retried
    _nothing_written(tmp_path / "data")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_source_names_whose_prompt_ids_could_collide_are_refused(tmp_path):
    # `a` + id `b-c` and `a-b` + id `c` would both be prompt a-b-c (stage 2 then died on every run)
    cfg = small_config(tmp_path / "data")
    cfg["source"]["language"] = None
    cfg["source"]["mix"] = [
        {"name": "a", "type": "jsonl", "fields": {"prompt": "q", "id": "id"},
         "data_files": [_jsonl(tmp_path / "a.jsonl", [{"id": "b-c", "q": "What is the capital of France?"}])]},
        {"name": "a-b", "type": "jsonl", "fields": {"prompt": "q", "id": "id"},
         "data_files": [_jsonl(tmp_path / "ab.jsonl", [{"id": "c", "q": "How many legs does a spider have?"}])]},
    ]
    path = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("01_prepare_data.py", "--config", str(path), "--samples", "2")
    assert_one_line_exit_2(proc, str(path), "source: mix.1.name: 'a-b' begins with 'a-'")
    _nothing_written(tmp_path / "data")
    # the same names apart: both ids are distinct, and the default ids are unchanged
    cfg["source"]["mix"][1]["name"] = "a_b"
    path = write_config(tmp_path / "config.yaml", cfg)
    run_script("01_prepare_data.py", "--config", str(path), "--samples", "2", check=True)
    ids = sorted(json.loads(l)["prompt_id"] for l in (tmp_path / "data" / "prompts.jsonl").read_text().splitlines())
    assert ids == ["a-b-c", "a_b-c"]


@pytest.mark.parametrize("data_dir", [".", "..", "{project}/sub/.."])
def test_fresh_refuses_a_data_dir_that_holds_the_config(tmp_path, data_dir):
    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)
    cfg = small_config(Path(data_dir.format(project=project)))
    path = write_config(project / "config.yaml", cfg)
    (project / "notes.txt").write_text("the user's own files")
    before = files_of(tmp_path)
    proc = run_script("run_pipeline.py", "2", "--config", str(path), "--fresh")
    assert_one_line_exit_2(proc, str(path), "paths.data_dir", "--fresh would rename it")
    assert files_of(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_fresh_refuses_the_project_or_a_parent_of_it(tmp_path):
    # checked on the function alone: on code without the check this would rename the repository
    for data_dir in (str(ROOT), str(ROOT.parent), "/"):
        cfg = small_config(Path(data_dir))
        path = write_config(tmp_path / "config.yaml", cfg)
        problem = fresh_refusal(load_config(path))
        assert problem and "paths.data_dir" in problem and "--fresh would rename it" in problem
        assert "the project" in problem, problem     # with the config file too, if it holds that
    cfg = small_config(tmp_path / "data")
    assert fresh_refusal(load_config(write_config(tmp_path / "config.yaml", cfg))) is None


def test_changed_keys_are_listed_with_their_values_and_a_digest_by_its_first_digits():
    from ope_prep.store import diff_keys
    old = {"run.seed": 42, "model.sha256": "a" * 64, "prepare.prompts.jsonl": "b" * 64, "gone": 1}
    new = {"run.seed": 7, "model.sha256": "c" * 64, "prepare.prompts.jsonl": "b" * 64, "added": "x"}
    assert diff_keys(old, new) == ["added: '<unset>' -> 'x'", "gone: 1 -> '<unset>'",
                                   f"model.sha256: {'a' * 12}… -> {'c' * 12}…", "run.seed: 42 -> 7"]
    assert diff_keys(new, new) == []


def test_every_stage_answers_the_stage_interface_and_the_unit_counts_add_up(tmp_path):
    """The runner, --status and --plan ask each stage module; the counts follow the config."""
    from ope_prep.stages import STAGE_NAMES, UNIT_STAGES
    from ope_prep.stages.registry import stage_module
    from ope_prep.stages.units import SELF_CHECKS_PER_POLICY
    config = load_config(write_config(tmp_path / "config.yaml", small_config(tmp_path / "data")))
    p, n = len(config.policies), 300
    counts = {s: stage_module(s).unit_count(config, n) for s in UNIT_STAGES}
    assert counts["generate"] == counts["judge"] == n * p
    # and p0's text event per prompt: the default's targets span two tokenizers
    assert counts["logprobs"] == n * p + p * SELF_CHECKS_PER_POLICY + n
    for name in STAGE_NAMES:
        module = stage_module(name)
        assert isinstance(module.OUTPUTS, list) and module.OUTPUTS, name
        if name != "summarize":      # summarize's estimate is the size of what is already there
            assert module.disk_estimate(config, 2 * n) > module.disk_estimate(config, n) > 0, name
