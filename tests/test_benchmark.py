"""The benchmark stays runnable and keeps its contract (numbers are not checked: speed is
measured by running it, never asserted in a test)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

from conftest import ROOT

LAST_LINE = re.compile(r"tf_vs_prefill=(\S+) tf_vs_echo=(\S+) gen_vs_chat=(\S+)")


def test_benchmark_runs_small_and_ends_with_the_ratio_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_llama.py"), "--prompts", "3",
                           "--rounds", "1", "--max-tokens", "8", "--echo-pairs", "1"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    assert all(math.isfinite(float(x)) and float(x) > 0 for x in match.groups())
    assert "| teacher forcing, ours (teacher_force_many) |" in proc.stdout


SCORING_LAST_LINE = re.compile(r"score_vs_server=(\S+)")


def test_scoring_benchmark_runs_small_and_ends_with_the_ratio_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--units", "1",
                           "--rounds", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    match = SCORING_LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    assert math.isfinite(float(match.group(1))) and float(match.group(1)) > 0
    assert "| in process (LocalScorer) |" in proc.stdout and "| llama_cpp.server (ApiScorer) |" in proc.stdout


SOURCES_LAST_LINE = re.compile(r"new_peak_rss_mib=(\S+) old_vs_new_rss=(\S+)")


def test_sources_benchmark_runs_small_and_ends_with_the_ratio_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sources.py"), "--rows", "20000",
                           "--samples", "500", "--rounds", "1", "--cache-dir", str(tmp_path), "--out", "-"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = SOURCES_LAST_LINE.fullmatch(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-500:]
    assert all(math.isfinite(float(x)) and float(x) > 0 for x in match.groups())
    assert "same prompts in the same order in every process (new, cold and old): yes" in proc.stdout
