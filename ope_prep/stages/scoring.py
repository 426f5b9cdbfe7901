"""What the judge (stage 3) and the oracle (stage 4) share: the loop that scores units and saves
each as it is done, and what a score is computed from. The prompt and the reading of the answer
are in ope_prep/judging.py, the scorers in backends/scorers.py.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from ..backends.scorers import Scorer, ScoringUnit, Tally
from ..judging import Judgement
from ..records import scored_digest
from ..store import WorkFile, failed_row, ok_row
from .units import progress, upstream_digests

# ---- the loop -------------------------------------------------------------------------------

_APPEND_EVERY_S = 2.0


def score_units(stage: str, scorer: Scorer, work: WorkFile, units: list[ScoringUnit],
                make_record: Callable[[ScoringUnit, Judgement], object], tally: Tally, desc: str = "") -> None:
    """Score ``units`` (none of them done yet), append their rows to ``work`` and count them in
    ``tally``. Rows are appended in small batches and always before returning or raising, so
    finished units survive a budget stop, an API outage, a kill or Ctrl-C."""
    if not units:
        return
    bar = progress(stage, len(units), "unit", desc)
    pending: list[dict] = []
    last_append = time.monotonic()
    try:
        for unit, outcome in scorer.score(units):
            if isinstance(outcome, Judgement):
                tally.ok += 1
                pending.append(ok_row(unit.key, make_record(unit, outcome)))
            else:
                tally.errors[outcome.reason] += 1
                extra = {"raw": outcome.raw} if outcome.raw else {}
                pending.append(failed_row(unit.key, outcome.reason, deterministic=outcome.deterministic,
                                          certain=outcome.certain, prompt_id=unit.prompt_id, **extra))
            bar.update(1)
            if len(pending) >= scorer.save_every or time.monotonic() - last_append > _APPEND_EVERY_S:
                # handed over before the write: a Ctrl-C inside it must not append them again below
                batch, pending, last_append = pending, [], time.monotonic()
                work.append(batch)
    finally:
        work.append(pending)
        bar.close()


def report(stage: str, scorer: Scorer, n_todo: int, tally: Tally, seconds: float) -> None:
    print(f"[{stage}] {scorer.summary(n_todo, tally, seconds)}"
          f"{f', {tally.failed} failed' if tally.failed else ''}", file=sys.stderr)
    if tally.errors:
        print(f"[{stage}] {tally.failed} units failed: "
              + "; ".join(f"{n} x {e}" for e, n in tally.errors.most_common(5)), file=sys.stderr)


def unit_input(unit: ScoringUnit) -> str:
    """What a score is computed from: the prompt and the response under judgment (also kept in
    the score's record, for stage 5 to check against the current response). Its "scored" tag is
    new with the records' digest: a unit scored before it is done again, so that every record
    carries one (an API judge's request cache answers it at no cost)."""
    return scored_digest(unit.prompt, unit.response)


def stage_inputs(ck: dict) -> dict:
    return upstream_digests(ck, ["prepare", "generate"])
