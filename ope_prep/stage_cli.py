"""What every numbered script does around its stage: config, lock, skip, refuse, mark complete.

A stage is skipped only when the checkpoint says it completed with the same fingerprint and
its output files still parse and match their recorded digests. It refuses to touch work made
with another config (and lists the changed keys) unless given --force, which moves that work
aside to ``<data_dir>/superseded/`` rather than deleting it.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import checkpoint
from .config import load_config
from .fingerprint import diff_keys
from .errors import EXIT_OK, InputError, PipelineError, RefusedError
from .stages import STAGE_NAMES
from .store import file_manifest

WORK_DIR = "work"


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (default: config.yaml beside the scripts)")
    p.add_argument("--force", action="store_true",
                   help="discard this stage's earlier work and outputs (moved to <data_dir>/superseded/) and redo it")
    return p


@contextmanager
def run_lock(data_dir: Path):
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RefusedError(f"{data_dir} is in use by another pipeline process; wait for it or stop it")
        yield


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


def require_complete(data_dir: Path, stages: list[str]) -> dict[str, dict]:
    """The checkpoint entries of the stages this one reads, each verified on disk."""
    ck = checkpoint.load(data_dir)["stages"]
    for name in stages:
        if name not in ck:
            raise InputError(f"stage {name!r} has not completed in {data_dir}; run it first")
        problem = verify_outputs(data_dir, ck[name]["outputs"])
        if problem:
            raise InputError(f"output of stage {name!r}: {problem}; rerun it (python run_pipeline.py "
                             f"--force-step {name})")
    return ck


def work_path(data_dir: Path, name: str) -> Path:
    return data_dir / WORK_DIR / f"{name}.jsonl"


def supersede(data_dir: Path, stage: str, outputs: list[str]) -> None:
    """Move a stage's work and outputs aside (kept, not deleted) and forget its completion."""
    dest = data_dir / "superseded" / f"{time.strftime('%Y%m%d-%H%M%S')}-{stage}"
    moved = []
    candidates = [p for p in (data_dir / WORK_DIR).glob(f"{stage}*")] + [data_dir / o for o in outputs]
    for src in candidates:
        if src.exists():
            target = dest / src.relative_to(data_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(target))
            moved.append(str(src.relative_to(data_dir)))
    checkpoint.forget(data_dir, [stage])
    if moved:
        print(f"[{stage}] --force: moved earlier work to {dest}: {', '.join(moved)}")


def main(stage: str, description: str, add_args=None, argv=None) -> int:
    parser = stage_parser(description)
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    module = importlib.import_module(f"ope_prep.stages.{stage}")
    started = time.time()
    try:
        config = load_config(args.config)
        data_dir = config.data_dir
        with run_lock(data_dir):
            ck = require_complete(data_dir, STAGE_NAMES[:STAGE_NAMES.index(stage)])
            fp = module.fingerprint(config, args, ck)
            entry = checkpoint.load(data_dir)["stages"].get(stage)
            if args.force:
                supersede(data_dir, stage, list(entry["outputs"]) if entry else module.OUTPUTS)
            elif entry is not None:
                if entry["fingerprint"] != fp:
                    changed = "; ".join(diff_keys(entry["fingerprint"], fp))
                    raise RefusedError(
                        f"stage {stage} completed with another config ({changed}); restore the config, "
                        f"or rerun from here with: python run_pipeline.py --force-step {stage}")
                problem = verify_outputs(data_dir, entry["outputs"])
                if problem is None:
                    print(f"[{stage}] already complete, outputs verified; nothing to do")
                    return EXIT_OK
                print(f"[{stage}] {problem}: redoing the stage (finished units are kept)")
                checkpoint.forget(data_dir, [stage])
            outputs = module.run(config, args, fp)
            checkpoint.mark_complete(data_dir, stage, fp, outputs)
        print(f"[{stage}] complete in {time.time() - started:.1f}s")
        return EXIT_OK
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\n[{stage}] interrupted; finished units are saved: rerun the same command to resume",
              file=sys.stderr)
        return 130


def script_main(stage: str, description: str, add_args=None) -> None:
    """Entry point of a numbered script."""
    sys.exit(main(stage, description, add_args))
