"""What every numbered script does around its stage: config, lock, skip, refuse, mark complete.

A stage is skipped only when the checkpoint says it completed with the same fingerprint and the
same inputs, and its output files still parse and match their recorded digests. It refuses to
touch work made with another config (and lists the changed keys) unless given --force, which
moves that work aside to ``<data_dir>/superseded/`` rather than deleting it. When only its
inputs changed (a run grown to more prompts), it is redone, keeping every finished unit whose
own inputs are unchanged. Before it starts, the disk must have room for what it writes.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jinja2

from . import checkpoint
from .commands import rerun_command, run_command, stage_command
from .config import load_config
from .files import DATA_DIR_MARKER, PROMPTS, WORK_DIR
from .errors import EXIT_BAD_INPUT, EXIT_OK, InputError, PipelineError, RefusedError, report_crash
from .stages import STAGE_NAMES
from .stages.registry import Stage, stage_module
from .stages.units import outdated_inputs
from .store import count_records, diff_keys, file_manifest



def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (default: config.yaml beside the scripts)")
    p.add_argument("--force", action="store_true",
                   help="discard this stage's earlier work and outputs (moved to <data_dir>/superseded/) and redo it")
    return p


# The runner (run_pipeline.py) holds its data dir's lock across all its stages and passes the
# locked file to the stages it starts: this names that file descriptor.
LOCK_FD_ENV = "OPE_PREP_LOCK_FD"
LOCK_NAME = ".lock"


def acquire_lock(data_dir: Path):
    """Lock ``<data_dir>/.lock`` for this process (an open file: the lock lasts while it is open)
    or refuse (RefusedError, exit 2) if another pipeline process holds it. A data dir this makes,
    or finds empty, gets the marker that lets --fresh rename it (files.DATA_DIR_MARKER)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not any(p.name != LOCK_NAME for p in data_dir.iterdir()):
        (data_dir / DATA_DIR_MARKER).write_text("made by ope-prep: run_pipeline.py --fresh may rename this folder\n")
    fh = open(data_dir / LOCK_NAME, "a+")        # not "w": a refused process must not clear it
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        raise RefusedError(f"{data_dir} is in use by another pipeline process"
                           f"{f' ({holder})' if holder else ''}; wait for it or stop it")
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return fh


def inherited_lock(data_dir: Path) -> bool:
    """Whether this process was started by the runner holding data_dir's lock: the descriptor
    named by OPE_PREP_LOCK_FD is open on this very lock file, and holds its lock."""
    fd = os.environ.get(LOCK_FD_ENV)
    if not fd or not fd.isdigit():
        return False
    try:
        got, want = os.fstat(int(fd)), os.stat(data_dir / LOCK_NAME)
        if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
            return False
        # The runner's own lock (one open file description): taking it again is a no-op; a
        # descriptor of another open of the file would be refused here.
        fcntl.flock(int(fd), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextmanager
def run_lock(data_dir: Path):
    """A stage's hold on its data dir: its own lock, or the one of the runner that started it."""
    if inherited_lock(data_dir):
        yield
        return
    fh = acquire_lock(data_dir)
    try:
        yield
    finally:
        fh.close()


def verify_outputs(data_dir: Path, outputs: dict[str, dict]) -> str | None:
    """None if every recorded output still parses and matches its digest, else what is wrong."""
    for rel, want in outputs.items():
        path = data_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        try:
            got = file_manifest(path)
        except (InputError, ValueError) as e:
            return f"{rel} is damaged ({e})"
        if got != want:
            return f"{rel} changed since it was written ({got['records']} records, digest differs)"
    return None


def require_complete(config, stages: list[str]) -> dict[str, dict]:
    """The checkpoint entries of the stages this one reads, each verified on disk and current."""
    data_dir = config.data_dir
    ck = checkpoint.load(data_dir)["stages"]
    for name in stages:
        if name not in ck:
            raise InputError(f"stage {name!r} has not completed in {data_dir}; run it first")
        problem = verify_outputs(data_dir, ck[name]["outputs"])
        if problem:
            raise InputError(f"output of stage {name!r}: {problem}; rerun it: {rerun_command(config, name)}")
    for name in stages:
        changed = outdated_inputs(ck, name)
        if changed:
            raise InputError(
                f"stage {name} is out of date: {', '.join(changed)} changed since it ran, so its outputs are "
                f"not of the current ones; update it first: {stage_command(config, name)} (it keeps every "
                f"unit whose own inputs are unchanged), or run every stage in order: {run_command(config)}")
    return ck



def supersede(data_dir: Path, stage: str, outputs: list[str], fingerprint_keys: dict) -> None:
    """Move a stage's work and outputs aside (kept, not deleted), forget its completion and
    record it in the forced redo under way (so that the redo, resumed, keeps its own work)."""
    dest = data_dir / "superseded" / f"{time.strftime('%Y%m%d-%H%M%S')}-{stage}"
    moved = []
    candidates = [p for p in (data_dir / WORK_DIR).glob(f"{stage}*")] + [data_dir / o for o in outputs]
    for src in candidates:
        if src.exists():
            target = dest / src.relative_to(data_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(target))
            moved.append(str(src.relative_to(data_dir)))
    # Its request caches too (a redo against a changed API judge must ask again); the spend they
    # record stays counted against the budget.
    from .backends.request_cache import supersede_caches
    moved += supersede_caches(data_dir, stage, dest)
    checkpoint.redo_superseded(data_dir, stage, fingerprint_keys)
    if moved:
        print(f"[{stage}] --force: moved earlier work to {dest}: {', '.join(moved)}")


def refusal(config, stage: str, old: dict, new: dict, cli_keys: dict[str, str]) -> RefusedError:
    """Why a completed stage's work cannot be reused, with the way out that fits the cause: a
    command-line argument (``cli_keys``: fingerprint key -> its flag, for the flags given) is
    fixed on the command line, a config key in the config."""
    changed = diff_keys(old, new)
    flags = sorted({flag for key, flag in cli_keys.items() if old.get(key) != new.get(key)})
    if flags:
        given = ", ".join(f"{f} {new[k]!r} (this run was made with {old.get(k)!r})"
                          for k, f in sorted(cli_keys.items()) if old.get(k) != new.get(k))
        return RefusedError(
            f"stage {stage} completed with another {', '.join(flags)}: {given}; rerun with the run's "
            f"own value (or without the flag if the config gives it), or start a new run in another "
            f"data directory, or start over here keeping the old run: {run_command(config, '--fresh')}")
    return RefusedError(
        f"stage {stage} completed with another config ({'; '.join(changed)}); restore the config, "
        f"or rerun from here with: {rerun_command(config, stage)}")


def run_size(config, module: Stage, args) -> int:
    """Prompts the run has once the stage is done: what stage 1 is asked for, what it wrote for
    the later stages."""
    sized = getattr(module, "run_size", None)
    return sized(config, args) if sized else count_records(config.data_dir / PROMPTS)


def check_disk(config, stage: str, module: Stage, args) -> None:
    """Refuse to start a stage that could not finish writing its files."""
    data_dir = config.data_dir
    free = shutil.disk_usage(data_dir).free
    need = module.disk_estimate(config, run_size(config, module, args))
    spare = config.run.min_free_disk_mb * 2**20
    if free < need + spare:
        raise RefusedError(
            f"{data_dir}: {free / 2**20:.0f} MB free on its disk; stage {stage} may write about "
            f"{need / 2**20:.0f} MB and run.min_free_disk_mb keeps {spare / 2**20:.0f} MB spare. Free some space "
            "(or lower run.min_free_disk_mb) and rerun the same command: finished work is kept")


def main(stage: str, description: str, add_args=None, argv=None) -> int:
    parser = stage_parser(description)
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    module = stage_module(stage)
    started = time.time()
    config = None
    try:
        config = load_config(args.config)
        # A stage's flags that only read (prepare's --preview) are answered without the lock,
        # the checkpoint or the data directory.
        answered = getattr(module, "read_only", lambda c, a: None)(config, args)
        if answered is not None:
            return answered
        data_dir = config.data_dir
        with run_lock(data_dir):
            ck = require_complete(config, STAGE_NAMES[:STAGE_NAMES.index(stage)])
            fp = module.fingerprint(config, args, ck)
            inputs = module.inputs(config, args, ck)
            entry = checkpoint.load(data_dir)["stages"].get(stage)
            force = args.force
            if force and checkpoint.redo_resumes(data_dir, stage, fp):
                # This forced redo already moved the earlier work aside: what is here now is its
                # own (the same command given again after an interruption), resumed, not redone.
                print(f"[{stage}] resuming the forced redo begun {checkpoint.redo(data_dir)['started_at']}: "
                      "its finished units are kept")
                force = False
            if force:
                supersede(data_dir, stage, list(entry["outputs"]) if entry else module.OUTPUTS, fp)
            elif entry is not None:
                if entry["fingerprint"] != fp:
                    raise refusal(config, stage, entry["fingerprint"], fp,
                                  getattr(module, "cli_keys", lambda a: {})(args))
                if entry.get("inputs") != inputs:
                    # A grown (or shrunk) run: the stage is redone for the new inputs, and every
                    # finished unit whose own inputs are unchanged is kept.
                    print(f"[{stage}] its inputs changed ({'; '.join(diff_keys(entry.get('inputs') or {}, inputs))}): "
                          "updating; finished units whose own inputs are unchanged are kept")
                    checkpoint.forget(data_dir, [stage])
                else:
                    problem = verify_outputs(data_dir, entry["outputs"])
                    if problem is None:
                        print(f"[{stage}] already complete, outputs verified; nothing to do")
                        return EXIT_OK
                    print(f"[{stage}] {problem}: redoing the stage (finished units are kept)")
                    checkpoint.forget(data_dir, [stage])
            check_disk(config, stage, module, args)
            outputs = module.run(config, args, fp)
            checkpoint.mark_complete(data_dir, stage, fp, outputs, inputs)
            checkpoint.redo_finish(data_dir, stage)     # a redo of this stage alone ends here
        print(f"[{stage}] complete in {time.time() - started:.1f}s")
        return EXIT_OK
    except PipelineError as e:
        # Work of another config found inside the stage (a work file's header): the way out is
        # this stage's redo, said as a command to paste.
        redo = f": {rerun_command(config, stage)}" if isinstance(e, RefusedError) and e.redo else ""
        print(f"error: {e}{redo}", file=sys.stderr)
        return e.exit_code
    except jinja2.TemplateError as e:
        # A chat template the config does not set (the GGUF file's own) is only compiled here;
        # the config's own are checked when it is loaded (config.check_chat_template).
        print(f"error: {template_error(config, e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\n[{stage}] interrupted; finished units are saved: rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as e:      # noqa: BLE001: a crash gets its own exit code, never "units failed"
        return report_crash(e, stage, config.data_dir / "logs" if config is not None else None)


def template_error(config, error: Exception) -> str:
    """One line for a chat template that failed: which model's, and how to fix it."""
    from .backends.llama import load_tokenizer
    from .config import check_chat_template, template_problem
    for key, m in config.models.items():
        try:
            tok = load_tokenizer(str(config.model_path(key)), m.chat_template)
            check_chat_template(tok.template_text)
        except Exception as e:       # noqa: BLE001: any failure names this model
            where = (f"models.{key}.chat_template" if m.chat_template else
                     f"models.{key}: the chat template of {config.model_path(key).name} (set "
                     f"models.{key}.chat_template to replace it)")
            return f"{config.config_path}: {where}: {template_problem(e)}"
    return f"a chat template fails: {template_problem(error)}"


def script_main(stage: str, description: str, add_args=None) -> None:
    """Entry point of a numbered script."""
    sys.exit(main(stage, description, add_args))
