"""`python run_pipeline.py [N]`: every stage in order, each in its own process, in rounds.

A stage is marked complete only by its own process after its outputs are written, so a stage
that crashes or exits non-zero is never marked complete; the exit code is taken from the
process itself, never from a pipe. Everything the stages print goes to the terminal and to
one timestamped log file per run in <data_dir>/logs/.

Rounds. A long run does not wait for its last prompt to give a usable result: it takes the
first ``run.first_round`` prompts through every stage to a validated report and CJE export, then
``run.round_growth`` times as many, and so on up to N. A round only computes the new prompts'
units (a run grows without redoing anything, see stages/prepare.py), and each round's results
are kept in ``<data_dir>/snapshots/<n>_prompts/`` (hard links: no copy, and later rounds replace
files by renaming, so a snapshot never changes). Where the run stands is in
``<data_dir>/logs/run_state.json``, which ``--status`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import checkpoint
from .commands import rerun_command
from .config import Config, load_config
from .errors import (EXIT_BAD_INPUT, EXIT_CRASH, EXIT_UNITS_FAILED, ConfigError, PipelineError, RefusedError,
                     report_crash)
from .files import DATA_DIR_MARKER, DATASET_INFO, PROJECT_DIR, RUN_PARAMS, RUN_STATE, SNAPSHOTS, WORK_DIR
from .report import cje_line
from .rounds import prepare_flags, run_rounds
from .runner import LOCK_FD_ENV, acquire_lock
from .stages import STAGE_ALIASES, STAGE_NAMES, STAGES, later_stages
from .status import status_text, whole_run_eta
from .store import fsync_dir, write_json


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number of at least 1")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run the whole OPE data pipeline; resumes where it stopped, and grows a finished "
                    "run to a larger N keeping all its work.",
        epilog="Stages: " + ", ".join(f"{k}={v}" for k, v in STAGE_ALIASES.items()))
    p.add_argument("samples", nargs="?", type=int, default=10000, help="number of prompts (default 10000)")
    p.add_argument("--config", default=None, help="YAML config (default: config.yaml beside the scripts)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: run.seed in the config)")
    p.add_argument("--only", action="append", default=[], metavar="GROUP",
                   help="use only the sources of this group of source.mix (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GROUP",
                   help="leave out the sources of this group of source.mix (repeatable)")
    p.add_argument("--force-step", metavar="STAGE", default=None,
                   help="redo STAGE and every stage after it (earlier work and their API request caches are moved "
                        "to <data_dir>/superseded/: a redo asks again; what was paid still counts)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: the data directory is renamed to <data_dir>.old-<time>, not deleted (refused "
                        "while another run holds it, or if it holds the config or the project)")
    p.add_argument("--status", action="store_true",
                   help="print where the run in the config's data directory stands, and exit (read-only; "
                        "safe while a run is going)")
    p.add_argument("--plan", action="store_true",
                   help="print what a run of N prompts asks for (generations, teacher-forcing passes, judge and "
                        "oracle calls, tokens, API cost from the config's prices) and the local wall time projected "
                        "from a probe run in a scratch directory; write nothing in the data directory")
    p.add_argument("--plan-probe", type=_positive, default=2, metavar="K",
                   help="--plan times the local stages on K and on 4K prompts (default 2)")
    p.add_argument("--check-providers", action="store_true",
                   help="check every policy model served by an engine (models.<key>.endpoint): its "
                        "generation and teacher-forcing log-probabilities must agree; and score one unit "
                        "with a judge or oracle behind an endpoint; then exit")
    return p.parse_args(argv)


def check_providers(config: Config) -> int:
    """The engine check of every policy model on an endpoint, and one probe unit for a judge or
    oracle behind an endpoint, alone: 0 if all pass."""
    from .backends.providers import check_engine
    keys = [k for k in dict.fromkeys(p.model for p in config.policies) if config.models[k].endpoint]
    results = [check_engine(config, key, "check") for key in keys]
    for r in results:
        print(r.line())
    ok = all(r.ok for r in results)
    for which in ("judge", "oracle"):
        if not getattr(config, which).kind.in_process:
            line, passed = _probe_scorer(config, which)
            print(line)
            ok = ok and passed
    if not keys and all(getattr(config, w).kind.in_process for w in ("judge", "oracle")):
        print("every model runs in process: nothing to check")
    return 0 if ok else EXIT_BAD_INPUT


def _probe_scorer(config: Config, which: str) -> tuple[str, bool]:
    """Score one fixed unit with the judge or oracle: its answer must be read, with a distribution."""
    from .backends.scorers import ScoringUnit, open_scorer
    from .judging import Judgement
    api = getattr(config, which)
    unit = ScoringUnit("check", "check", "check", "How do I boil an egg?",
                       "Put the egg in boiling water for 8 to 10 minutes, then cool it in cold water.")
    name = f"{which} ({api.provider} {api.model})"
    try:
        # check: asked anew every time (a probe answered from the cache would pass with the server
        # down or changed), as the engine check is
        with open_scorer(config, which, f"check_{which}", config.run.seed, need_distribution=True,
                         check=True) as scorer:
            _, outcome = next(iter(scorer.score([unit])))
    except PipelineError as e:
        return f"{name}: REFUSED: {e}", False
    if isinstance(outcome, Judgement):
        return f"{name}: ok: answered {outcome.raw!r}, score {outcome.score:.2f}, mean {outcome.mean:.2f}", True
    return f"{name}: REFUSED: {outcome.reason}", False


def _done_samples(data_dir: Path) -> int:
    """How many prompts the run in data_dir holds (0 if none): rounds below that are done."""
    try:
        return int(json.loads((data_dir / RUN_PARAMS).read_text(encoding="utf-8"))["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def snapshot(data_dir: Path, n: int) -> Path:
    """Keep the finished, validated outputs of every stage as snapshots/<n>_prompts/ (with the
    checkpoint, so the snapshot is itself a data directory stage 5 accepts)."""
    ck = checkpoint.load(data_dir)["stages"]
    final = data_dir / SNAPSHOTS / f"{n}_prompts"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for stage in STAGE_NAMES:
        for rel in ck[stage]["outputs"]:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(data_dir / rel, dst)        # every output is replaced by rename, never in place
            except OSError:
                shutil.copy2(data_dir / rel, dst)
    shutil.copy2(checkpoint.checkpoint_path(data_dir), checkpoint.checkpoint_path(tmp))
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)
    return final


def _tee(proc: subprocess.Popen, log, on_idle, every_s: float = 30.0) -> None:
    """Copy the stage's output to the terminal and the log; call on_idle() every every_s."""
    fd = proc.stdout.fileno()
    last = time.monotonic()
    while True:
        ready, _, _ = select.select([fd], [], [], every_s)
        if time.monotonic() - last >= every_s:
            on_idle()
            last = time.monotonic()
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        log.write(chunk)
        log.flush()


class StallWatch:
    """Says so in the log when a unit stage's work files have not grown for a while."""

    def __init__(self, data_dir: Path, stage: str, minutes: float, say):
        self.data_dir, self.stage, self.limit, self.say = data_dir, stage, minutes * 60, say
        self.size, self.since, self.warned = self._size(), time.time(), 0.0

    def _size(self) -> int:
        return sum(p.stat().st_size for p in (self.data_dir / WORK_DIR).glob(f"{self.stage}*.jsonl"))

    def __call__(self) -> None:
        size, now = self._size(), time.time()
        if size != self.size:
            self.size, self.since = size, now
        elif now - self.since >= self.limit and now - self.warned >= self.limit:
            self.warned = now
            self.say(f"[runner] warning: stage {self.stage} has saved no unit for {(now - self.since) / 60:.0f} "
                     f"minutes (run.stall_warning_minutes {self.limit / 60:g}); it may be stuck. "
                     "Look at the lines above; Ctrl-C and the same command resume it.")


def main(argv=None) -> int:
    args = parse_args(argv)
    state: dict = {}
    try:
        return _main(args, state)
    except Exception as e:      # noqa: BLE001: a crash gets its own exit code (not retried)
        config = state.get("config")
        return report_crash(e, "run_pipeline", config.data_dir / "logs" if config is not None else None)


def _main(args, state: dict) -> int:
    """main's work; ``state`` receives the config once it is loaded (for a crash's log)."""
    try:
        if args.samples < 1:
            raise PipelineError(f"N must be at least 1 (got {args.samples})")
        forced = None
        if args.force_step is not None:
            forced = STAGE_ALIASES.get(args.force_step, args.force_step)
            if forced not in STAGE_NAMES:
                raise PipelineError(f"--force-step {args.force_step}: not a stage "
                                    f"({', '.join(STAGE_NAMES)} or {', '.join(STAGE_ALIASES)})")
        config = state["config"] = load_config(args.config)
        if args.status:
            print(status_text(config))
            return 0
        if args.check_providers:
            return check_providers(config)
        if args.plan:
            from .plan import plan_text
            print(plan_text(config, args))
            return 0
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        # One lock for the whole run, taken before anything is written or renamed: another
        # runner, or a stage run by hand, is refused until this run ends; the stages this
        # runner starts share it (runner.inherited_lock).
        lock = lock_data_dir(config, args.fresh)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    try:
        return _run(config, args, forced, lock.fileno())
    except PipelineError as e:      # a refusal (a damaged checkpoint, ...): one line, its own code, not a crash
        print(f"error: {e}")        # where the run's own lines go
        return e.exit_code
    finally:
        lock.close()


def fresh_refusal(config: Config) -> str | None:
    """Why --fresh must not rename this data dir (it holds the config or the project), or None."""
    data_dir = config.data_dir.resolve()
    held = [f"{what} ({path})" for what, path in (("the config file", Path(config.config_path).resolve()),
                                                  ("the project", PROJECT_DIR))
            if path == data_dir or data_dir in path.parents]
    if not held:
        return None
    return (f"{config.config_path}: paths.data_dir: {config.paths.data_dir!r} is {data_dir}, which holds "
            f"{' and '.join(held)}: --fresh would rename it. Give the run a data directory of its own "
            f"(e.g. paths.data_dir: data)")


def lock_data_dir(config: Config, fresh: bool):
    """Lock the data dir for this runner (the open lock file); with fresh, first rename the earlier
    run's data dir under its own lock, then lock the new one."""
    data_dir = config.data_dir
    if fresh:
        problem = fresh_refusal(config)
        if problem:
            raise ConfigError(problem)
    existed = data_dir.exists()
    if fresh and existed and not (data_dir / DATA_DIR_MARKER).is_file():
        raise ConfigError(
            f"{config.config_path}: paths.data_dir: {data_dir} was not made by this pipeline (it has no "
            f"{DATA_DIR_MARKER}): --fresh renames only a data directory of its own. Move it aside yourself "
            f"(or, if it is a run of this pipeline from before the marker, create {data_dir / DATA_DIR_MARKER})")
    lock = acquire_lock(data_dir)
    if fresh and existed:
        old = data_dir.with_name(f"{data_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            data_dir.rename(old)
        except OSError as e:
            raise RefusedError(f"--fresh: cannot rename {data_dir} to {old}: {e.strerror}")
        finally:
            lock.close()
        print(f"--fresh: moved the earlier run to {old}")
        lock = acquire_lock(data_dir)
    return lock


def resume_command(config: Config, args, forced: str | None) -> str:
    """The command that resumes this run where it stopped: its N, config and flags, and the
    forced redo under way, which it resumes (it keeps the redo's own finished work)."""
    return " ".join(["python run_pipeline.py", str(args.samples), "--config",
                     shlex.quote(str(config.config_path)), *map(shlex.quote, prepare_flags(args)),
                     *(["--force-step", forced] if forced else [])])


def begin_redo(config: Config, forced: str | None, say) -> str | None:
    """Record the forced redo this run starts (``--force-step``), or resume the one under way:
    given the same --force-step again, or none, the runner goes on with it and every stage keeps
    what it already redid. Returns the stage the redo starts at, or None."""
    data_dir = config.data_dir
    current = checkpoint.redo(data_dir)
    if forced is None and current is not None and current["by_runner"]:
        forced = current["from"]
    if forced is None:
        return None
    redo, resumed = checkpoint.redo_begin(data_dir, forced, by_runner=True)
    if resumed:
        say(f"resuming the forced redo of {forced} and the stages after it, begun {redo['started_at']}: "
            f"what it finished is kept (redone so far: {', '.join(redo['stages']) or 'none'})")
    return forced


def _run(config: Config, args, forced: str | None, lock_fd: int) -> int:
    data_dir = config.data_dir
    log_path = data_dir / "logs" / f"run_{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    done = _done_samples(data_dir)
    rounds = [n for n in run_rounds(config, args.samples)
              if n >= done or n == args.samples]
    with open(log_path, "ab") as log:
        def say(text: str) -> None:
            print(text, flush=True)
            log.write((text + "\n").encode())
            log.flush()

        say(f"run of {args.samples} prompts, config {config.config_path}, data in {data_dir}, log {log_path}")
        if len(rounds) > 1:
            say(f"rounds: {', '.join(map(str, rounds))} prompts (run.first_round {config.run.first_round}, "
                f"run.round_growth {config.run.round_growth:g}); each ends in a validated snapshot in "
                f"{data_dir / SNAPSHOTS}/")
        if len(rounds) > 1:
            # The sources must supply all N before the first round starts, not days later when
            # the last round asks for them: stage 1 draws the whole sample once, writing nothing.
            # (With one round, stage 1 is the first thing to run anyway.)
            cmd = [sys.executable, str(PROJECT_DIR / STAGES[0][1]), "--config", str(Path(config.config_path)),
                   "--samples", str(args.samples), "--preview", "0", *prepare_flags(args)]
            say(f"\n=== checking that the sources supply {args.samples} prompts: {' '.join(cmd[1:])}")
            rc = run_stage(cmd, log, StallWatch(data_dir, "prepare", config.run.stall_warning_minutes, say), lock_fd)
            if rc != 0:
                say(f"\nthe config cannot supply {args.samples} prompts (above); nothing was run")
                return rc
        forced = begin_redo(config, forced, say)
        resume = resume_command(config, args, forced)
        state = {"pid": os.getpid(), "started_at": time.time(), "samples": args.samples, "rounds": rounds,
                 "log": str(log_path)}
        run_started = time.time()
        for r, n in enumerate(rounds, 1):
            force = set(later_stages(forced)) if forced and r == 1 else set()
            try:
                rc = run_round(config, args, n, force, say, log,
                               {**state, "round": r, "round_size": n, "round_started_at": time.time()},
                               lock_fd, resume)
            except KeyboardInterrupt:
                say(f"\ninterrupted; finished units are saved. Resume with: {resume}")
                return 130
            if rc != 0:
                return rc
            snap = snapshot(data_dir, n)
            write_json(data_dir / RUN_STATE, {**state, "round": r, "round_size": n, "stage": None,
                                              "finished_at": time.time(), "latest_snapshot": str(snap)})
            say(f"=== round {r}/{len(rounds)} done: {n} prompts, snapshot {snap} "
                f"({(time.time() - run_started) / 60:.1f} min since start)")
        checkpoint.redo_finish(data_dir)       # every round is done: the forced redo too
        say(f"outputs: {data_dir} (report.md, dataset_info.json, cje/ for CJE 0.3 and 0.9); log: {log_path}")
        # Said last, where a user looks first: whether CJE can calibrate on this many labels.
        cje = json.loads((data_dir / DATASET_INFO).read_text(encoding="utf-8")).get("cje")
        say(f"CJE: {cje_line(cje)}" if cje else
            f"CJE: this summary predates the CJE section; `{rerun_command(config, 'summarize')}` writes it")
    return 0


def run_stage(cmd: list[str], log, watch: "StallWatch", lock_fd: int | None = None) -> int:
    """One stage's process; its exit code (130 if interrupted). lock_fd: the runner's lock on the
    data dir, passed to the stage (which would otherwise be refused by it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if lock_fd is not None:
        env[LOCK_FD_ENV] = str(lock_fd)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_DIR,
                            pass_fds=(lock_fd,) if lock_fd is not None else ())
    try:
        _tee(proc, log, watch, every_s=min(30.0, watch.limit / 2))
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        return 130


def run_round(config: Config, args, n: int, force: set[str], say, log, state: dict,
              lock_fd: int | None = None, resume: str = "the same command") -> int:
    """Every stage on the first n prompts; 0, or the exit code of the stage that failed.
    resume: the command that resumes the run, for the messages."""
    data_dir = config.data_dir
    config_arg = ["--config", str(Path(config.config_path))]
    timings = []
    for i, (name, script) in enumerate(STAGES, 1):
        cmd = [sys.executable, str(PROJECT_DIR / script), *config_arg]
        if name == "prepare":
            cmd += ["--samples", str(n), *prepare_flags(args)]
        if name in force:
            cmd.append("--force")
        where = f"round {state['round']}/{len(state['rounds'])}, {n} prompts: " if len(state["rounds"]) > 1 else ""
        say(f"\n=== [{i}/{len(STAGES)}] {where}{name}: {' '.join(cmd[1:])}")
        started = time.time()
        for attempt in range(1, config.run.stage_attempts + 1):
            write_json(data_dir / RUN_STATE, {**state, "stage": name, "stage_started_at": started,
                                              "attempt": attempt})
            rc = run_stage(cmd, log, StallWatch(data_dir, name, config.run.stall_warning_minutes, say), lock_fd)
            # --force discards earlier work once: a retry keeps what the forced attempt finished,
            # and its failure counts, so a deterministic failure gets quarantined
            cmd = [c for c in cmd if c != "--force"]
            if rc == 130:
                say(f"\ninterrupted during {name}; finished units are saved. Resume with: {resume}")
                return 130
            if rc != EXIT_UNITS_FAILED or name in ("prepare", "summarize") or attempt == config.run.stage_attempts:
                break
            # Units failed: transient ones (an API outage) may pass later, deterministic ones are
            # quarantined after run.quarantine_after tries. Either way the run goes on by itself.
            wait = config.run.retry_wait_s * 2 ** (attempt - 1)
            say(f"\n[runner] stage {name} ended with failed units; running it again in {wait:.0f}s "
                f"(attempt {attempt + 1} of run.stage_attempts {config.run.stage_attempts}); finished units are kept")
            time.sleep(wait)
        timings.append((name, time.time() - started))
        if rc == 0 and name != "summarize":
            say(f"[runner] {whole_run_eta(config, state['samples'])}")
        if rc == EXIT_CRASH:
            say(f"\nstage {name} crashed (exit {rc}, the line above names its traceback); it is not marked "
                f"complete, and a crash is not retried: fix the cause, then resume with: {resume}")
            return rc
        if rc != 0:
            say(f"\nstage {name} failed (exit {rc}); it is not marked complete. "
                f"Fix the cause and resume with: {resume} (finished work is kept)")
            return rc
    say("\n=== done. Stage times: " + ", ".join(f"{s} {t:.0f}s" for s, t in timings))
    return 0
