"""What the unit-based stages share: unit keys, per-unit seeds, progress, finishing."""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

from .. import diagnostics as dx
from . import STAGE_NAMES
from ..errors import BudgetExceeded, FatalApiError, LowOverlap, PipelineError, TooManyExcluded, UnitsFailedError
from ..files import OVERLAP, PROMPTS, QUARANTINE_DIR, RUN_PARAMS, quarantine_file, usage_file, work_path
from ..records import Prompt, Quarantined
from ..store import WorkFile, failed_row, read_jsonl, write_jsonl


# Each policy's own responses teacher-forced by stage 2b to check its sampling propensities:
# all of them up to this many prompts, this many (a seeded choice) beyond.
SELF_CHECKS_PER_POLICY = 200

# Disk estimates (Stage.disk_estimate): measured records are about 25 bytes per response token
# and a few hundred bytes per unit; these are generous.
BYTES_PER_TOKEN = 40


def written_bytes(units: int, per_unit: int) -> int:
    """What a unit stage writes: each unit's work line, then its final record."""
    return 2 * units * per_unit


def unit_key(prompt_id: str, policy: str) -> str:
    return f"{prompt_id}/{policy}"


def unit_seed(run_seed: int, *parts: str) -> int:
    """A seed for one unit from the run seed and the unit's identity, so a resumed run draws
    exactly what an uninterrupted one would, whatever order the units run in."""
    h = hashlib.sha256("/".join([str(run_seed), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def self_check_prompts(prompt_ids: list[str]) -> list[str]:
    """The prompts whose responses stage 2b teacher-forces as self-checks, for every policy: the
    sample's first SELF_CHECKS_PER_POLICY, the same in stage 2b and stage 5. The sample is a
    seeded draw and a smaller one is a prefix of a larger one, so these are a random draw of the
    mix too, and a round that grows the run keeps them all: no check computed in one round is
    dropped in the next (a seeded choice among all prompts so far made a 10,000-prompt run in 8
    rounds compute 3,074 checks to keep 800)."""
    return list(prompt_ids[:SELF_CHECKS_PER_POLICY])


def read_run_seed(data_dir: Path) -> int:
    """The run seed stage 1 recorded (stage 5 checks the file itself and reports damage)."""
    return int(json.loads((data_dir / RUN_PARAMS).read_text(encoding="utf-8"))["seed"])


def load_prompts(data_dir: Path) -> list[Prompt]:
    return read_jsonl(data_dir / PROMPTS, Prompt)


def progress(stage: str, total: int, unit: str, desc: str = "") -> tqdm:
    return tqdm(total=total, desc=f"[{stage}] {desc}".rstrip(), unit=unit, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0,
                smoothing=0.1)


def excluded_prompts(data_dir: Path, stages: list[str]) -> dict[str, list[Quarantined]]:
    """prompt_id -> its quarantined units, from the quarantine files ``stages`` wrote so far."""
    excluded: dict[str, list[Quarantined]] = {}
    for stage in stages:
        path = data_dir / quarantine_file(stage)
        if path.exists():
            for q in read_jsonl(path, Quarantined):
                excluded.setdefault(q.prompt_id, []).append(q)
    return excluded


def exclusion_over_limit(n_excluded: int, n_prompts: int, limit: float) -> str | None:
    """What is wrong when more of a run's prompts are left out than validation.max_excluded_fraction
    allows (stage 5 refuses such a run; the scoring stages refuse to start one), else None."""
    if n_prompts and n_excluded > limit * n_prompts:
        return (f"{n_excluded} of {n_prompts} prompts are left out of the dataset because a unit of theirs was "
                f"quarantined, more than validation.max_excluded_fraction ({limit:g}) allows")
    return None


def refuse_if_too_many_excluded(stage: str, data_dir: Path, stages: list[str], n_prompts: int, limit: float) -> None:
    """Before a scoring stage pays for anything: stop (TooManyExcluded) when the earlier stages
    already left out more prompts than stage 5 accepts, saying which and why."""
    excluded = excluded_prompts(data_dir, stages)
    problem = exclusion_over_limit(len(excluded), n_prompts, limit)
    if problem:
        first = "; ".join(f"{pid} ({qs[0].stage} {qs[0].key}: {qs[0].error[:120]})"
                          for pid, qs in list(excluded.items())[:3])
        raise TooManyExcluded(f"stage {stage} not started, nothing paid: {problem}, so stage 5 would refuse the "
                              f"run ({first}; all in {data_dir / QUARANTINE_DIR}). Fix the cause, or raise the "
                              "limit if such prompts may be left out")


def low_overlap_targets(config, figures: dict) -> list[str]:
    """Stage 2b's overlap figures (OVERLAP's "targets") judged by the config's current limits."""
    v = config.validation
    return [why for t, f in figures.items() if t != config.clone_policy
            and (why := dx.low_overlap(t, f, v.min_ess_fraction, v.min_typicality_coverage))]


def refuse_if_overlap_low(stage: str, config) -> None:
    """Before a scoring stage pays for anything: with validation.on_low_overlap 'stop', stop
    (LowOverlap) when a target's overlap with the base policy is below the limits."""
    path = config.data_dir / OVERLAP
    if config.validation.on_low_overlap != "stop":
        return
    if not path.exists():
        print(f"[{stage}] overlap not checked: {path} is missing (written when stage 2b finishes)")
        return
    low = low_overlap_targets(config, json.loads(path.read_text(encoding="utf-8"))["targets"])
    if low:
        raise LowOverlap(f"stage {stage} not started, nothing paid: {'; '.join(low)} (figures in {path}). "
                         "Change the target or the base policy, or set validation.on_low_overlap: warn in "
                         f"{config.config_path} to score them anyway")


def run_identity(ck: dict) -> dict:
    """Stage 1's fingerprint (source, seed, ...) as part of a later stage's: what makes a prompt
    id mean the same prompt, and a unit's seed the same seed. Not the number of prompts: a run
    grows without invalidating its work."""
    return {f"run.{k}": v for k, v in ck["prepare"]["fingerprint"].items()}


def upstream_digests(ck: dict, stages: list[str]) -> dict:
    """The digests of the files a stage reads: when they change (a run grew), the stage is redone
    and keeps every unit whose own inputs are unchanged. Usage counts are no input."""
    return {f"{stage}.{rel}": m["sha256"] for stage in stages
            for rel, m in sorted(ck[stage]["outputs"].items()) if rel != usage_file(stage)}


def outdated_inputs(ck: dict, name: str) -> list[str]:
    """The upstream files (``<stage>/<file>``) whose digest now differs from the one completed stage
    ``name`` recorded (upstream_digests) when it ran. A stage run by hand after an earlier one was
    redone leaves the stages between them out of date: the runner runs every stage in order and so
    updates them; a stage run by itself must refuse to read them."""
    changed = []
    for key, digest in ck[name].get("inputs", {}).items():
        upstream, _, rel = key.partition(".")       # upstream_digests' "<stage>.<file>"
        if upstream in STAGE_NAMES and upstream in ck:
            if ck[upstream]["outputs"].get(rel, {}).get("sha256") != digest:
                changed.append(f"{upstream}/{rel}")
    return changed


# ---- a unit stage's life cycle: open its work file(s), do the units, stop on budget or a fatal
# API error saying what was kept, write the final files from the work (finish) -----------------

@contextmanager
def unit_work(stage: str, config, fp: dict, inputs: dict[str, str], name: Optional[str] = None) -> Iterator[WorkFile]:
    """The stage's work file, work/<name or stage>.jsonl, of the units ``inputs`` names (key ->
    input digest): a torn last line (a kill mid-write) is cut, and said; closed on the way out."""
    work = WorkFile(work_path(config.data_dir, name or stage), fp, inputs=inputs,
                    quarantine_after=config.run.quarantine_after)
    try:
        if work.repaired_bytes:
            print(f"[{stage}] cut a torn last line ({work.repaired_bytes} bytes) from {work.path}")
        yield work
    finally:
        work.close()


@contextmanager
def stop_on_api_errors(stage: str, *works_and_keys) -> Iterator[None]:
    """A spent budget or a fatal API error ends the stage, saying what was kept (`stopped`)."""
    try:
        yield
    except (BudgetExceeded, FatalApiError) as e:
        raise stopped(stage, e, *works_and_keys)


def finish(stage: str, data_dir: Path, works: list[WorkFile], outputs: dict[str, list[str]]) -> dict[str, dict]:
    """Write each final file (name -> its unit keys, in order; each key in one of ``works``)
    from the work files when every unit is settled, else fail listing why. Quarantined units are
    left out and listed in quarantine/<stage>.jsonl. Returns the manifests by file name."""
    owner = {k: w for w in works for k in w.inputs}
    keys = [k for ks in outputs.values() for k in ks]
    missing = [k for k in keys if not owner[k].settled(k)]
    if missing:
        failures = {k: r for w in works for k, r in w.failures().items()}
        sample = "; ".join(f"{k}: {failures[k]['error']}" for k in missing[:3] if k in failures)
        where = " and ".join(str(w.path) for w in works)
        raise UnitsFailedError(
            f"stage {stage}: {len(missing)} of {len(keys)} units not done ({sample or 'not run'}); "
            f"rerun to retry only those (their records are in {where})")
    manifests = {name: write_jsonl(data_dir / name, (owner[k].results[k]["record"] for k in ks if owner[k].done(k)))
                 for name, ks in outputs.items()}
    quarantined = [Quarantined(stage=stage, key=k, prompt_id=owner[k].results[k]["prompt_id"],
                               error=owner[k].results[k]["error"], tries=owner[k].results[k]["tries"])
                   for k in keys if owner[k].quarantined(k)]
    manifests[quarantine_file(stage)] = write_jsonl(data_dir / quarantine_file(stage), quarantined)
    if quarantined:
        print(f"[{stage}] {len(quarantined)} unit(s) quarantined (failed the same way every time; "
              f"their prompts are left out of the dataset): "
              + "; ".join(f"{q.key}: {q.error}" for q in quarantined[:3])
              + f" (all in {data_dir / quarantine_file(stage)})")
    return manifests


def stopped(stage: str, e: PipelineError, *works_and_keys) -> PipelineError:
    """The error that ends a stage early, saying what was kept. Arguments: work, keys, work, keys..."""
    pairs = list(zip(works_and_keys[::2], works_and_keys[1::2]))
    done = sum(w.done(k) for w, keys in pairs for k in keys)
    total = sum(len(keys) for _, keys in pairs)
    where = ", ".join(str(w.path) for w, _ in pairs)
    return type(e)(f"stage {stage} stopped: {e}. {done} of {total} units are done and saved ({where}); "
                   "fix the cause (e.g. raise the budget) and rerun the same command to do only the rest")


def exception_row(key: str, exc: Exception, prompt_id: str) -> dict:
    """The failed row for a unit a provider could not do: a request that failed (transient, or
    refused by the endpoint: see RequestFailed), or a ValueError (too long for the context, ...),
    which will fail the same way every time."""
    from ..backends.replies import RequestFailed
    if isinstance(exc, RequestFailed):
        return failed_row(key, str(exc), deterministic=exc.deterministic, certain=exc.certain, prompt_id=prompt_id)
    return failed_row(key, str(exc), certain=True, prompt_id=prompt_id)
