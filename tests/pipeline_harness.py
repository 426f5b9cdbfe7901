"""Running the real pipeline in a subprocess, killing it for real, and reading what it did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import ROOT

FINAL_FILES = ["prompts.jsonl", "responses.jsonl", "logprobs.jsonl", "judge_scores.jsonl",
               "oracle_labels.jsonl", "cje/logged_data.jsonl"]


def _cmd(config: Path, n: int, extra) -> list[str]:
    return [sys.executable, str(ROOT / "run_pipeline.py"), str(n), "--config", str(config), *extra]


def start(config: Path, n: int, trace: Path, *extra: str, log: Path | None = None,
          env: dict | None = None) -> subprocess.Popen:
    """The runner in its own process group, so that kill_group kills it and every stage."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(_cmd(config, n, extra), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env={**os.environ, "OPE_PREP_TRACE": str(trace), **(env or {})})


def run(config: Path, n: int, trace: Path, *extra: str, timeout: float = 900,
        env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(config, n, extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OPE_PREP_TRACE": str(trace), **(env or {})})


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def done_keys(data_dir: Path) -> dict[str, set[str]]:
    """Per work file, the keys whose latest durable line is a finished unit."""
    out: dict[str, set[str]] = {}
    for path in (data_dir / "work").glob("*.jsonl"):
        latest = {}
        for line in path.read_bytes().split(b"\n")[1:]:
            try:
                row = json.loads(line)
            except ValueError:
                continue   # a torn last line
            latest[row["key"]] = row["status"]
        out[path.stem] = {k for k, s in latest.items() if s == "ok"}
    return out


def trace_lines(trace: Path) -> list[tuple[str, str, str]]:
    if not trace.exists():
        return []
    # A kill can tear the trace's last line; its unit was not saved (the trace line comes first).
    return [tuple(f) for f in (l.split("\t") for l in trace.read_text().splitlines()) if len(f) == 3]


def computed_ok(trace: Path) -> Counter:
    return Counter((w, k) for w, k, s in trace_lines(trace) if s == "ok")


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.05) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(every)
    return False


def records(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def comparable(data_dir: Path) -> dict[str, list[dict]]:
    """The finished outputs that must equal an uninterrupted run's."""
    return {name: records(data_dir / name) for name in FINAL_FILES}
