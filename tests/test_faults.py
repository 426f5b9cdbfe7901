"""Faults produced for real: kill -9 of the whole process group at seeded random moments in
every stage (and between a final file's write and its rename), torn and truncated files, a
tampered checkpoint, and secrets in the environment. Nothing may be lost or computed twice."""

from __future__ import annotations

import pickle
import random
import re
import shutil
import time


from conftest import N, SECRET_MARKER, run_script, small_config, write_config
from ope_prep.stages import STAGE_NAMES
from pipeline_harness import (comparable, computed_ok, kill_group, records, run, start,
                              wait_for)

HEADER = re.compile(r"=== \[\d/6\] (\w+):")


def _stage_running(log) -> str | None:
    found = HEADER.findall(log.read_text(errors="replace")) if log.exists() else []
    return found[-1] if found else None


def _kill_runs(config, trace, data, tmp_path, targets, rng, kills, rename_files=()):
    """Start the runner, kill its process group in each target stage after a seeded random delay,
    then once between each named file's write and its rename; resume each time with the same
    command."""
    for target in targets:
        log = tmp_path / f"kill{len(kills)}.log"
        proc = start(config, N, trace, log=log)
        if not wait_for(lambda: _stage_running(log) == target, 600, proc):
            assert proc.wait() == 0, log.read_text()[-3000:]   # finished before reaching it
            continue
        delay = rng.uniform(0.0, 3.0 if target in ("prepare", "summarize") else 12.0)
        time.sleep(delay)
        kills.append(f"{target} +{delay:.1f}s" + (" (had exited)" if proc.poll() is not None else ""))
        kill_group(proc)
    for name in rename_files:
        proc = start(config, N, trace, log=tmp_path / f"rename_{name}.log",
                     env={"OPE_PREP_KILL_BEFORE_RENAME": name})
        proc.wait()
        kills.append(f"before rename of {name} (exit {proc.returncode})")
        kill_group(proc)


def test_kill_9_at_random_moments_in_every_stage_loses_nothing(reference, tmp_path):
    rng = random.Random(20261122)
    kills: list[str] = []
    # Run A: two kills inside every stage. Run B: a kill between each kind of final file's
    # write and its rename (stage outputs, the checkpoint, the CJE export).
    runs = [("a", [s for s in STAGE_NAMES for _ in range(2)], ()),
            ("b", [], ("prompts.jsonl", "responses.jsonl", "logprobs.jsonl", ".pipeline_checkpoint.pkl",
                       "judge_scores.jsonl", "oracle_labels.jsonl", "logged_data.jsonl"))]
    for name, targets, renames in runs:
        base = tmp_path / name
        config = write_config(base / "config.yaml", small_config(base / "data"))
        trace = base / "trace.tsv"
        _kill_runs(config, trace, base / "data", base, targets, rng, kills, renames)
        final = run(config, N, trace)
        assert final.returncode == 0, final.stdout[-3000:]
        # Every unit was computed exactly once over all the killed and resumed runs.
        counts = computed_ok(trace)
        assert counts and max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
        # The outputs equal the uninterrupted run's: no duplicate key, no missing key.
        assert comparable(base / "data") == comparable(reference[0] / "data")
        for out in ("responses.jsonl", "logprobs.jsonl", "judge_scores.jsonl"):
            keys = [(r["prompt_id"], r["policy"]) for r in records(base / "data" / out)]
            assert len(keys) == len(set(keys)) == N * 4
    print("kills:", kills)
    assert len(kills) >= 10, kills
    assert {k.split()[0] for k in kills} >= set(STAGE_NAMES) - {"prepare"}, kills


def _completed_copy(reference, tmp_path):
    shutil.copytree(reference[0] / "data", tmp_path / "data")
    return write_config(tmp_path / "config.yaml", small_config(tmp_path / "data"))


def test_torn_last_line_of_a_work_file_is_cut_and_recomputed(reference, tmp_path):
    config = _completed_copy(reference, tmp_path)
    data = tmp_path / "data"
    work = data / "work" / "judge.jsonl"
    lines = work.read_bytes().split(b"\n")
    torn = b"\n".join(lines[:-2]) + b"\n" + lines[-2][: len(lines[-2]) // 2]   # last record cut mid-line
    work.write_bytes(torn)
    (data / "judge_scores.jsonl").unlink()      # the stage must run again to notice
    trace = tmp_path / "trace.tsv"
    proc = run(config, N, trace)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "torn" in proc.stdout or "cut" in proc.stdout
    assert sum(computed_ok(trace).values()) >= 1
    assert [w for (w, _), n in computed_ok(trace).items() if n] == ["judge"]
    assert records(data / "judge_scores.jsonl") == records(reference[0] / "data" / "judge_scores.jsonl")


def test_final_file_truncated_to_half_makes_its_stage_redo_it(reference, tmp_path):
    config = _completed_copy(reference, tmp_path)
    data = tmp_path / "data"
    path = data / "logprobs.jsonl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    trace = tmp_path / "trace.tsv"
    proc = run(config, N, trace)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "[logprobs] logprobs.jsonl is damaged" in proc.stdout
    assert sum(computed_ok(trace).values()) == 0    # rebuilt from the work file, nothing recomputed
    assert records(path) == records(reference[0] / "data" / "logprobs.jsonl")


def test_checkpoint_truncated_to_10_bytes_gives_a_message_and_a_way_out(reference, tmp_path):
    config = _completed_copy(reference, tmp_path)
    data = tmp_path / "data"
    ck = data / ".pipeline_checkpoint.pkl"
    ck.write_bytes(ck.read_bytes()[:10])
    proc = run(config, N, tmp_path / "trace.tsv")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "checkpoint is damaged" in proc.stdout and "mv " in proc.stdout
    # The way out it names works: move it aside and rerun; finished units are not recomputed.
    shutil.move(ck, str(ck) + ".bad")
    trace = tmp_path / "trace2.tsv"
    proc = run(config, N, trace)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert sum(computed_ok(trace).values()) == 0
    assert comparable(data) == comparable(reference[0] / "data")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def test_tampered_checkpoint_is_refused_and_never_runs_code(reference, tmp_path):
    config = _completed_copy(reference, tmp_path)
    data = tmp_path / "data"
    target = tmp_path / "written_by_pickle.txt"
    payload = {"version": 1, "stages": {"prepare": _Evil(target)}}
    (data / ".pipeline_checkpoint.pkl").write_bytes(pickle.dumps(payload))
    assert not target.exists()
    for script in ("run_pipeline.py", "02_generate_responses.py"):
        args = [str(N)] if script == "run_pipeline.py" else []
        proc = run_script(script, *args, "--config", str(config))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "refused" in out and "Traceback" not in out, out
        assert not target.exists()


def test_secret_in_environment_never_reaches_any_file(reference):
    base = reference[0]
    for path in base.rglob("*"):
        if path.is_file():
            assert SECRET_MARKER.encode() not in path.read_bytes(), path
    assert SECRET_MARKER not in reference[3].stdout + reference[3].stderr
