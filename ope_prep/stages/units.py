"""What the unit-based stages share: unit keys, per-unit seeds, progress, finishing."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import UnitsFailedError
from ..records import Prompt
from ..store import WorkFile, read_jsonl, write_jsonl

PROMPTS = "prompts.jsonl"
RUN_PARAMS = "run.json"     # the run's samples and seed (stage 1), read by the later stages
RESPONSES = "responses.jsonl"


def unit_key(prompt_id: str, policy: str) -> str:
    return f"{prompt_id}/{policy}"


def unit_seed(run_seed: int, *parts: str) -> int:
    """A seed for one unit from the run seed and the unit's identity, so a resumed run draws
    exactly what an uninterrupted one would, whatever order the units run in."""
    h = hashlib.sha256("/".join([str(run_seed), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def read_run_seed(data_dir: Path) -> int:
    """The run seed stage 1 recorded (stage 5 checks the file itself and reports damage)."""
    return int(json.loads((data_dir / RUN_PARAMS).read_text(encoding="utf-8"))["seed"])


def load_prompts(data_dir: Path) -> list[Prompt]:
    return read_jsonl(data_dir / PROMPTS, Prompt)


def progress(stage: str, total: int, unit: str, desc: str = "") -> tqdm:
    return tqdm(total=total, desc=f"[{stage}] {desc}".rstrip(), unit=unit, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0,
                smoothing=0.1)


def finish(stage: str, work: WorkFile, keys: list[str], out_path: Path) -> dict:
    """Write the final file from the work file when every unit is done, else fail listing why."""
    missing = [k for k in keys if not work.done(k)]
    if missing:
        failures = work.failures()
        sample = "; ".join(f"{k}: {failures[k]['error']}" for k in missing[:3] if k in failures)
        work.close()
        raise UnitsFailedError(
            f"stage {stage}: {len(missing)} of {len(keys)} units not done ({sample or 'not run'}); "
            f"rerun to retry only those (their records are in {work.path})")
    manifest = write_jsonl(out_path, work.ok_records(keys))
    work.close()
    return manifest
