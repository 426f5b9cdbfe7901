"""The benchmark stays runnable and keeps its contract (numbers are not checked: speed is
measured by running it, never asserted in a test)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from conftest import ROOT

LAST_LINE = re.compile(r"gen_vs_decode=(\S+) \(min (\S+), max (\S+)\) tf_vs_prefill=(\S+) "
                       r"\(min (\S+), max (\S+)\) tf_vs_echo=(\S+) gen_vs_chat=(\S+)")


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


KEPT_LAST_LINE = re.compile(r"kept_vs_per_call=(\S+) \(min (\S+), max (\S+)\) score_vs_prefill=(\S+) "
                            r"\(min (\S+), max (\S+)\)")


def test_kept_prefix_benchmark_runs_small_and_ends_with_both_ratios():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kept_prefix.py"), "--units", "8",
                           "--rounds", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    match = KEPT_LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    assert all(math.isfinite(float(x)) and float(x) > 0 for x in match.groups())
    assert "the same scores both ways on every unit" in proc.stdout


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


RUN_LAST_LINE = re.compile(r"projected_10k_h=(\S+) \(min (\S+), max (\S+)\)")


def test_run_benchmark_times_two_sizes_and_ends_with_the_projection_line(tmp_path):
    """bench_run.py on a config whose judge is an API (so only stages 1, 2 and 2b run: nothing
    is asked of the unreachable judge)."""
    from conftest import small_config, write_config
    cfg = small_config(tmp_path / "data")
    cfg["judge"] = {"provider": "openai", "model": "judge-model", "api_key_env": "OPE_BENCH_KEY",
                    "base_url": "http://127.0.0.1:9/v1"}
    path = write_config(tmp_path / "config.yaml", cfg)
    out_file = tmp_path / "bench.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_run.py"), "--config", str(path),
                           "--small", "1", "--large", "3", "--rounds", "1", "--output", str(out_file)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "OPE_BENCH_KEY": "x"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    match = RUN_LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    median, low, high = map(float, match.groups())
    assert 0 < low <= median <= high
    assert "stages timed: prepare, generate, logprobs" in proc.stdout
    assert "not timed (an API, or after one): judge, oracle, summarize" in proc.stdout
    assert "in the config's 8 rounds (100, 200, 400, 800, 1600, 3200, 6400, 10000)" in proc.stdout
    assert out_file.read_text() == proc.stdout
    assert not (tmp_path / "data").exists()
