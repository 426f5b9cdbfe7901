"""`python run_pipeline.py [N]`: every stage in order, each in its own process.

A stage is marked complete only by its own process after its outputs are written, so a stage
that crashes or exits non-zero is never marked complete; the exit code is taken from the
process itself, never from a pipe. Everything the stages print goes to the terminal and to
one timestamped log file per run in <data_dir>/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .config import PROJECT_DIR, load_config
from .errors import EXIT_BAD_INPUT, PipelineError
from .report import cje_line
from .stages import STAGE_NAMES, STAGES, later_stages
from .stages.summarize import DATASET_INFO

STAGE_ALIASES = {"1": "prepare", "2": "generate", "2b": "logprobs", "3": "judge", "4": "oracle",
                 "5": "summarize"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run the whole OPE data pipeline; resumes where it stopped.",
        epilog="Stages: " + ", ".join(f"{k}={v}" for k, v in STAGE_ALIASES.items()))
    p.add_argument("samples", nargs="?", type=int, default=10000, help="number of prompts (default 10000)")
    p.add_argument("--config", default=None, help="YAML config (default: config.yaml beside the scripts)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: run.seed in the config)")
    p.add_argument("--force-step", metavar="STAGE", default=None,
                   help="redo STAGE and every stage after it (earlier work is moved to <data_dir>/superseded/)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: the data directory is renamed to <data_dir>.old-<time>, not deleted")
    return p.parse_args(argv)


def _tee(proc: subprocess.Popen, log) -> None:
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        log.write(chunk)
        log.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.samples < 1:
            raise PipelineError(f"N must be at least 1 (got {args.samples})")
        forced = None
        if args.force_step is not None:
            forced = STAGE_ALIASES.get(args.force_step, args.force_step)
            if forced not in STAGE_NAMES:
                raise PipelineError(f"--force-step {args.force_step}: not a stage "
                                    f"({', '.join(STAGE_NAMES)} or {', '.join(STAGE_ALIASES)})")
        config = load_config(args.config)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    data_dir = config.data_dir
    if args.fresh and data_dir.exists():
        old = data_dir.with_name(f"{data_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        data_dir.rename(old)
        print(f"--fresh: moved the earlier run to {old}")
    log_path = data_dir / "logs" / f"run_{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    force = set(later_stages(forced)) if forced else set()
    config_arg = ["--config", str(Path(config.config_path))]
    timings = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        def say(text: str) -> None:
            print(text, flush=True)
            log.write((text + "\n").encode())
            log.flush()

        say(f"run of {args.samples} prompts, config {config.config_path}, data in {data_dir}, log {log_path}")
        for i, (name, script) in enumerate(STAGES, 1):
            cmd = [sys.executable, str(PROJECT_DIR / script), *config_arg]
            if name == "prepare":
                cmd += ["--samples", str(args.samples)]
                if args.seed is not None:
                    cmd += ["--seed", str(args.seed)]
            if name in force:
                cmd.append("--force")
            say(f"\n=== [{i}/{len(STAGES)}] {name}: {' '.join(cmd[1:])}")
            started = time.time()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    cwd=PROJECT_DIR)
            try:
                _tee(proc, log)
                rc = proc.wait()
            except KeyboardInterrupt:
                rc = proc.wait()
                say(f"\ninterrupted during {name}; finished units are saved. Resume with the same command.")
                return 130
            timings.append((name, time.time() - started))
            if rc != 0:
                say(f"\nstage {name} failed (exit {rc}); it is not marked complete. "
                    "Fix the cause and rerun the same command: finished work is kept.")
                return rc
        say("\n=== done. Stage times: " + ", ".join(f"{n} {t:.0f}s" for n, t in timings))
        say(f"outputs: {data_dir} (report.md, dataset_info.json, cje/ for CJE 0.3 and 0.9); log: {log_path}")
        # Said last, where a user looks first: whether CJE can calibrate on this many labels.
        cje = json.loads((data_dir / DATASET_INFO).read_text(encoding="utf-8")).get("cje")
        say(f"CJE: {cje_line(cje)}" if cje else
            "CJE: this summary predates the CJE section; `--force-step 5` writes it")
    return 0
