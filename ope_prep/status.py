"""`python run_pipeline.py --status`: where a run stands, read from its files while it runs.

Read-only and lock-free: it never takes the run's lock, never repairs a file (a torn last line
is skipped, not cut), and writes nothing. For each unit stage it counts, among the units of the
current round, those done, failed and quarantined, from the latest line per unit of the work
files; throughput is over the units saved in the last 10 minutes (each work line has its time).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import checkpoint
from .config import Config
from .errors import PipelineError
from .files import PROMPTS, RUN_PARAMS, RUN_STATE, SNAPSHOTS, WORK_DIR
from .stages import STAGE_NAMES, UNIT_STAGES
from .stages.registry import stage_module
from .store import count_records, is_quarantined

WINDOW_S = 600.0


def _rows(path: Path) -> dict[str, dict]:
    """Latest line per unit key of a work file, skipping a torn or half-written last line."""
    latest: dict[str, dict] = {}
    try:
        data = path.read_bytes()
    except OSError:
        return latest
    for line in data.split(b"\n")[1:]:
        try:
            row = json.loads(line)
            latest[row["key"]] = row
        except (ValueError, KeyError, TypeError):
            continue
    return latest


def unit_totals(config: Config, n: int) -> dict[str, int]:
    """Units each unit stage has for n prompts (the oracle's share is its expected count)."""
    return {stage: stage_module(stage).unit_count(config, n) for stage in UNIT_STAGES}


def _stage_rows(data_dir: Path, stage: str) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for path in sorted((data_dir / WORK_DIR).glob(f"{stage}*.jsonl")):
        rows.update(_rows(path))
    return rows


def measured_rate(rows: dict[str, dict]) -> float | None:
    """Units per second a stage has saved while it was busy, over all its runs in this data dir:
    the time between consecutive saves, a gap of more than WINDOW_S (the stage stopped, or
    another stage ran) not counted. None before it has a measured stretch."""
    times = sorted(r["t"] for r in rows.values() if isinstance(r.get("t"), (int, float)))
    busy = sum(b - a for a, b in zip(times, times[1:]) if b - a <= WINDOW_S)
    return (len(times) - 1) / busy if len(times) > 1 and busy > 0 else None


def whole_run_eta(config: Config, samples: int, quarantine_after: int | None = None) -> str:
    """The whole run's ETA, all rounds up to ``samples`` prompts: each unit stage's units not yet
    done (or quarantined) at that stage's own measured speed (`measured_rate`), summed. Stages
    1 and 5 and model loading are not counted; a stage not yet measured is named."""
    data_dir = config.data_dir
    quarantine_after = config.run.quarantine_after if quarantine_after is None else quarantine_after
    seconds, unmeasured, parts = 0.0, [], []
    for stage, total in unit_totals(config, samples).items():
        rows = _stage_rows(data_dir, stage)
        settled = sum(r["status"] == "ok" or is_quarantined(r, quarantine_after) for r in rows.values())
        left = max(total - settled, 0)
        rate = measured_rate(rows)
        if left and rate is None:
            unmeasured.append(stage)
        elif left:
            seconds += left / rate
            parts.append(f"{stage} {_fmt_eta(left / rate)}")
    text = f"whole run to {samples} prompts (all rounds): "
    if unmeasured:
        return text + (f"ETA over {_fmt_eta(seconds)}" if parts else "ETA not known yet") + (
            f" ({', '.join(parts) + '; ' if parts else ''}not measured yet: {', '.join(unmeasured)})")
    return text + (f"ETA {_fmt_eta(seconds)} ({', '.join(parts)}; at each stage's measured speed)"
                   if parts else "every unit done")


def _fmt_eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_text(config: Config, now: float | None = None) -> str:
    data_dir = config.data_dir
    now = time.time() if now is None else now
    if not data_dir.exists():
        return f"{data_dir}: no run here yet"
    out = [f"run in {data_dir}"]
    try:
        state = json.loads((data_dir / RUN_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    if state:
        alive = _alive(state.get("pid"))
        rounds = state.get("rounds", [])
        where = (f"round {state.get('round')}/{len(rounds)} ({state.get('round_size')} prompts; rounds "
                 f"{', '.join(map(str, rounds))})" if rounds else "")
        if state.get("stage") and alive:
            out.append(f"runner: running (pid {state['pid']}), {where}, stage {state['stage']} for "
                       f"{_fmt_eta(now - state.get('stage_started_at', now))}; target {state.get('samples')} prompts")
        elif state.get("finished_at") and state.get("round") == len(rounds):
            out.append(f"runner: finished all {len(rounds)} round(s) ({state.get('samples')} prompts)")
        else:
            out.append(f"runner: not running (last: {where}, stage {state.get('stage')}); rerun the same "
                       "command to resume")
        out.append(f"log: {state.get('log')}")
    try:
        ck = checkpoint.load(data_dir)["stages"]
    except PipelineError as e:
        ck = {}
        out.append(f"checkpoint: {e}")
    n = count_records(data_dir / PROMPTS)
    try:
        samples = json.loads((data_dir / RUN_PARAMS).read_text(encoding="utf-8"))["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        samples = None
    out.append(f"prompts: {n} in {PROMPTS}" + (f" (stage 1 asked for {samples})" if samples else ""))
    totals = unit_totals(config, n)
    quarantine_after = config.run.quarantine_after
    round_start = state.get("round_started_at", 0.0)
    for stage in STAGE_NAMES:
        # Complete for this round: marked complete since the round began (a stage completed in
        # an earlier round is redone for the new prompts when its turn comes).
        complete = stage in ck and time.mktime(time.strptime(ck[stage]["completed_at"], "%Y-%m-%dT%H:%M:%S")) >= int(round_start)
        if stage not in totals:
            out.append(f"  {stage:<9} {'complete' if complete else 'not complete'}")
            continue
        if complete:
            out.append(f"  {stage:<9} complete")
            continue
        rows = _stage_rows(data_dir, stage)
        done = sum(r["status"] == "ok" for r in rows.values())
        quarantined = sum(is_quarantined(r, quarantine_after) for r in rows.values())
        failed = sum(r["status"] == "failed" for r in rows.values()) - quarantined
        recent = [r["t"] for r in rows.values() if r.get("t", 0) >= now - WINDOW_S]
        total = totals[stage]
        line = f"  {stage:<9} {done}/{total} done"
        if stage == "oracle":
            line = f"  {stage:<9} {done}/~{total} done"
        line += f", {failed} failed, {quarantined} quarantined"
        if recent:
            rate = len(recent) / max(now - min(recent), 1.0)
            left = max(total - done - quarantined, 0)
            line += f"; {rate * 60:.1f} units/min over the last {_fmt_eta(now - min(recent))}, ETA {_fmt_eta(left / rate)}"
        elif rows:
            last = max((r.get("t", 0) for r in rows.values()), default=0)
            line += f"; last unit saved {_fmt_eta(now - last)} ago" if last else ""
        out.append(line)
    if state.get("samples"):
        out.append(whole_run_eta(config, state["samples"], quarantine_after))
    snaps = sorted((p for p in (data_dir / SNAPSHOTS).glob("*_prompts") if p.is_dir()),
                   key=lambda p: int(p.name.split("_")[0]))
    out.append(f"latest snapshot: {snaps[-1]}" if snaps else "latest snapshot: none yet")
    return "\n".join(out)


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
