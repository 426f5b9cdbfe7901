"""The benchmark stays runnable and keeps its contract (numbers are not checked: speed is
measured by running it, never asserted in a test)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from conftest import ROOT

def run_benchmark(script: str, *args: str, last_line: re.Pattern, timeout: int, env=None) -> tuple[str, re.Match]:
    """Run benchmarks/<script> with args; it must exit 0 and end with a line matching last_line.
    Returns its stdout and that match."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = last_line.fullmatch(last)
    assert match, last
    return proc.stdout, match


def all_positive_finite(match: re.Match) -> bool:
    return all(math.isfinite(float(x)) and float(x) > 0 for x in match.groups())


LAST_LINE = re.compile(r"gen_vs_decode=(\S+) \(min (\S+), max (\S+)\) tf_vs_prefill=(\S+) "
                       r"\(min (\S+), max (\S+)\) tf_vs_echo=(\S+) gen_vs_chat=(\S+)")


def test_benchmark_runs_small_and_ends_with_the_ratio_line():
    out, match = run_benchmark("bench_llama.py", "--prompts", "3", "--rounds", "1", "--max-tokens", "8",
                               "--echo-pairs", "1", last_line=LAST_LINE, timeout=900)
    assert all_positive_finite(match)
    assert "| teacher forcing, ours (teacher_force_many) |" in out


KEPT_LAST_LINE = re.compile(r"kept_vs_per_call=(\S+) \(min (\S+), max (\S+)\) score_vs_prefill=(\S+) "
                            r"\(min (\S+), max (\S+)\)")


def test_kept_prefix_benchmark_runs_small_and_ends_with_both_ratios():
    out, match = run_benchmark("bench_kept_prefix.py", "--units", "8", "--rounds", "1",
                               last_line=KEPT_LAST_LINE, timeout=600)
    assert all_positive_finite(match)
    assert "the same scores both ways on every unit" in out


SCORING_LAST_LINE = re.compile(r"score_vs_server=(\S+)")


def test_scoring_benchmark_runs_small_and_ends_with_the_ratio_line():
    out, match = run_benchmark("bench_scoring.py", "--units", "1", "--rounds", "1",
                               last_line=SCORING_LAST_LINE, timeout=600)
    assert all_positive_finite(match)
    assert "| in process (LocalScorer) |" in out and "| llama_cpp.server (ApiScorer) |" in out


SOURCES_LAST_LINE = re.compile(r"new_peak_rss_mib=(\S+) old_vs_new_rss=(\S+)")


def test_sources_benchmark_runs_small_and_ends_with_the_ratio_line(tmp_path):
    out, match = run_benchmark("bench_sources.py", "--rows", "20000", "--samples", "500", "--rounds", "1",
                               "--cache-dir", str(tmp_path), "--out", "-", last_line=SOURCES_LAST_LINE, timeout=600)
    assert all_positive_finite(match)
    assert "same prompts in the same order in every process (new, cold and old): yes" in out


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
    out, match = run_benchmark("bench_run.py", "--config", str(path), "--small", "1", "--large", "3",
                               "--rounds", "1", "--output", str(out_file), last_line=RUN_LAST_LINE, timeout=900,
                               env={**os.environ, "OPE_BENCH_KEY": "x"})
    median, low, high = map(float, match.groups())
    assert 0 < low <= median <= high
    assert "stages timed: prepare, generate, logprobs" in out
    assert "not timed (an API, or after one): judge, oracle, summarize" in out
    assert "in the config's 8 rounds (100, 200, 400, 800, 1600, 3200, 6400, 10000)" in out
    assert out_file.read_text() == out
    assert not (tmp_path / "data").exists()


def test_judge_study_scores_a_small_set_and_a_rerun_prints_it_from_its_cache(tmp_path):
    """scripts/judge_study.py on the first two prompts of the study set (6 responses), one scorer:
    it scores them, and --cached-only then prints the same row without a model."""
    rows = (ROOT / "benchmarks" / "judge_study_set.jsonl").read_text(encoding="utf-8").splitlines()
    small = tmp_path / "set.jsonl"
    small.write_text("\n".join(rows[:6]) + "\n", encoding="utf-8")
    args = [sys.executable, str(ROOT / "scripts" / "judge_study.py"), "--set", str(small), "--models", "smollm2_135m",
            "--rubrics", "verdict_0_1", "--cache", str(tmp_path / "cache")]
    scored = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert scored.returncode == 0, scored.stderr[-2000:]
    row = re.search(r"^smollm2_135m verdict_0_1 .*$", scored.stdout, re.M)
    assert row and "6 responses" in scored.stdout, scored.stdout
    cached = subprocess.run(args + ["--cached-only"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cached.returncode == 0 and row.group() in cached.stdout, cached.stdout
