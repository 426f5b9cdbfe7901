"""The pipeline checkpoint: which stages completed, with which config and which outputs.

It is a pickle because the users asked for one, but it holds only plain data and is loaded
through an unpickler that admits no class at all: a tampered file that tries to construct an
object (the ``__reduce__`` trick) is refused before anything runs.
"""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path

from .errors import RefusedError
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
