"""The pipeline checkpoint: which stages completed, with which config and which outputs.

It is a pickle because the users asked for one, but it holds only plain data and is loaded
through an unpickler that admits no class at all: a tampered file that tries to construct an
object (the ``__reduce__`` trick) is refused before anything runs.

It also records a forced redo (``--force-step STAGE``, or a stage's ``--force``) from its start
to its end, so that the same command, given again after an interruption, resumes the redo instead
of moving its own finished units and request caches aside once more (see `redo_begin`).
"""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path

from .errors import RefusedError
from .stages import STAGE_NAMES
from .store import atomic_write_bytes

CHECKPOINT_NAME = ".pipeline_checkpoint.pkl"
VERSION = 1


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Plain containers, str, numbers, bool and None are built by opcodes, not by classes,
        # so no legitimate checkpoint ever reaches this point.
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def checkpoint_path(data_dir: Path) -> Path:
    return data_dir / CHECKPOINT_NAME


def load(data_dir: Path) -> dict:
    path = checkpoint_path(data_dir)
    if not path.exists():
        return {"version": VERSION, "stages": {}}
    way_out = (f"move it aside (mv {path} {path}.bad) and rerun: finished stages are verified "
               "again from their files and unit work is resumed from data/work")
    try:
        data = _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise RefusedError(f"{path}: refused, the checkpoint is damaged or tampered with ({e}); {way_out}")
    except Exception as e:  # truncated or garbage bytes raise many kinds of errors
        raise RefusedError(f"{path}: the checkpoint is damaged ({type(e).__name__}); {way_out}")
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("stages"), dict):
        raise RefusedError(f"{path}: not a checkpoint of this pipeline; {way_out}")
    return data


def save(data_dir: Path, data: dict) -> None:
    atomic_write_bytes(checkpoint_path(data_dir), pickle.dumps(data, protocol=4))


def mark_complete(data_dir: Path, stage: str, fingerprint_keys: dict, outputs: dict[str, dict],
                  inputs: dict | None = None) -> None:
    """fingerprint_keys: the config the stage's work belongs to (another one is refused);
    inputs: what it was computed from this time (other inputs: the stage is updated)."""
    data = load(data_dir)
    data["stages"][stage] = {
        "fingerprint": fingerprint_keys,
        "inputs": inputs or {},
        "outputs": outputs,
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save(data_dir, data)


def forget(data_dir: Path, stages: list[str]) -> None:
    data = load(data_dir)
    for s in stages:
        data["stages"].pop(s, None)
    save(data_dir, data)


# ---- a forced redo, from its start to its end ------------------------------------------------
# checkpoint["redo"] = {"from": stage, "started_at": time, "by_runner": bool,
#                       "stages": {stage: the fingerprint its earlier work was moved aside for}}
# A stage listed with the fingerprint it runs with now has already moved its earlier work aside
# in this redo: what it holds is the redo's own, kept. The runner's redo ends when its run ends;
# a stage's own (``--force`` by hand) when that stage completes.

def redo(data_dir: Path) -> dict | None:
    """The forced redo under way in data_dir, or None."""
    return load(data_dir).get("redo")


def redo_begin(data_dir: Path, stage: str, by_runner: bool) -> tuple[dict, bool]:
    """The redo of ``stage`` and later: the one under way if it is a redo from the same stage
    (resumed: True), else a new one, recorded now."""
    data = load(data_dir)
    current = data.get("redo")
    if current is not None and current["from"] == stage:
        if by_runner and not current["by_runner"]:    # the runner takes over a stage's own redo
            current["by_runner"] = True
            save(data_dir, data)
        return current, True
    data["redo"] = {"from": stage, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "by_runner": by_runner, "stages": {}}
    save(data_dir, data)
    return data["redo"], False


def redo_resumes(data_dir: Path, stage: str, fingerprint_keys: dict) -> bool:
    """Whether ``stage`` already moved its earlier work aside in the redo under way, for this
    very config: its work now is the redo's own, to be resumed, not moved aside again."""
    current = redo(data_dir)
    return current is not None and current["stages"].get(stage) == fingerprint_keys


def redo_superseded(data_dir: Path, stage: str, fingerprint_keys: dict) -> None:
    """``stage``'s earlier work is moved aside: forget its completion and note it, in one write,
    in the redo under way if that covers the stage (it starts at this stage or before), else in
    a redo of its own."""
    data = load(data_dir)
    data["stages"].pop(stage, None)
    current = data.get("redo")
    if current is None or current["from"] not in STAGE_NAMES[:STAGE_NAMES.index(stage) + 1]:
        current = data["redo"] = {"from": stage, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "by_runner": False, "stages": {}}
    current["stages"][stage] = fingerprint_keys
    save(data_dir, data)


def redo_finish(data_dir: Path, stage: str | None = None) -> None:
    """End the redo under way: the runner's (stage None) when its run ends, a stage's own when
    that stage completes."""
    data = load(data_dir)
    current = data.get("redo")
    if current is None or (stage is not None and (current["by_runner"] or current["from"] != stage)):
        return
    del data["redo"]
    save(data_dir, data)
