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
LOGPROBS = "logprobs.jsonl"
SELF_CONSISTENCY = "self_consistency.jsonl"

# Each policy's own responses teacher-forced by stage 2b to check its sampling propensities:
# all of them up to this many prompts, this many (a seeded choice) beyond.
SELF_CHECKS_PER_POLICY = 200


def unit_key(prompt_id: str, policy: str) -> str:
    return f"{prompt_id}/{policy}"


def unit_seed(run_seed: int, *parts: str) -> int:
    """A seed for one unit from the run seed and the unit's identity, so a resumed run draws
    exactly what an uninterrupted one would, whatever order the units run in."""
    h = hashlib.sha256("/".join([str(run_seed), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def self_check_prompts(run_seed: int, prompt_ids: list[str], policy: str) -> list[str]:
    """The prompts whose `policy` responses stage 2b teacher-forces as a self-check: a seeded
    choice, the same in stage 2b and stage 5, in prompt order."""
    if len(prompt_ids) <= SELF_CHECKS_PER_POLICY:
        return list(prompt_ids)
    chosen = set(sorted(prompt_ids, key=lambda pid: unit_seed(run_seed, pid, policy, "self-check"))
                 [:SELF_CHECKS_PER_POLICY])
    return [pid for pid in prompt_ids if pid in chosen]


def read_run_seed(data_dir: Path) -> int:
    """The run seed stage 1 recorded (stage 5 checks the file itself and reports damage)."""
    return int(json.loads((data_dir / RUN_PARAMS).read_text(encoding="utf-8"))["seed"])


def load_prompts(data_dir: Path) -> list[Prompt]:
    return read_jsonl(data_dir / PROMPTS, Prompt)


def progress(stage: str, total: int, unit: str, desc: str = "") -> tqdm:
    return tqdm(total=total, desc=f"[{stage}] {desc}".rstrip(), unit=unit, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0,
                smoothing=0.1)


def finish(stage: str, work: WorkFile, outputs: dict[Path, list[str]]) -> dict[str, dict]:
    """Write each final file (path -> its unit keys, in order) from the work file when every
    unit is done, else fail listing why. Returns the manifests by file name."""
    keys = [k for ks in outputs.values() for k in ks]
    missing = [k for k in keys if not work.done(k)]
    if missing:
        failures = work.failures()
        sample = "; ".join(f"{k}: {failures[k]['error']}" for k in missing[:3] if k in failures)
        work.close()
        raise UnitsFailedError(
            f"stage {stage}: {len(missing)} of {len(keys)} units not done ({sample or 'not run'}); "
            f"rerun to retry only those (their records are in {work.path})")
    manifests = {path.name: write_jsonl(path, work.ok_records(ks)) for path, ks in outputs.items()}
    work.close()
    return manifests
