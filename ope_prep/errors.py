"""Errors the user sees as one line, and the exit codes the runner relies on."""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_UNITS_FAILED = 1   # the stage ran, but some units failed: rerun to retry only those
EXIT_BAD_INPUT = 2      # bad config, bad input, refusal: nothing was written
EXIT_STOPPED = 3        # stopped before the work was done (a budget, an API refusing every request):
                        # finished units are kept; rerunning helps only once the user acts
EXIT_CRASH = 4          # an uncaught exception (a bug, or an input no check foresaw: a 0-byte model
                        # file): the same run would crash the same way, so nothing retries it


class PipelineError(Exception):
    """An error with a one-line message meant for the user (no traceback)."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(PipelineError):
    pass


class InputError(PipelineError):
    pass


class RefusedError(PipelineError):
    """The data directory holds work from another config, or is locked by another run. ``redo``:
    redoing the stage that raised it is the way out (the stage's runner names the command)."""

    def __init__(self, message: str, redo: bool = False):
        super().__init__(message)
        self.redo = redo


class UnitsFailedError(PipelineError):
    exit_code = EXIT_UNITS_FAILED


class ValidationFailed(PipelineError):
    """Stage 5 found data that must not go to an estimator."""

    exit_code = EXIT_UNITS_FAILED


class BudgetExceeded(PipelineError):
    exit_code = EXIT_STOPPED


class FatalApiError(PipelineError):
    """Every further request would fail the same way (bad key, no access, unknown model)."""

    exit_code = EXIT_STOPPED


class TooManyExcluded(PipelineError):
    """More prompts were left out (quarantined) than validation.max_excluded_fraction allows: the
    later stages would be paid for a run that stage 5 refuses."""

    exit_code = EXIT_STOPPED


class LowOverlap(PipelineError):
    """A target's importance weights rest on too few prompts (stage 2b's overlap figures) and
    validation.on_low_overlap is 'stop': the judge and oracle would be paid for weights that
    mean little."""

    exit_code = EXIT_STOPPED


class EngineDown(PipelineError):
    """Every replica of an engine stayed down through models.<key>.endpoint.outage_wait_minutes."""

    exit_code = EXIT_STOPPED


class EngineRefused(PipelineError):
    """An inference engine failed its check: its log-probabilities would give wrong weights."""


def report_crash(exc: BaseException, name: str, log_dir: Path | None) -> int:
    """An uncaught exception, told as one line on stderr; its traceback goes to a file in
    ``log_dir`` (the data dir's logs; the temporary directory if there is none yet), which the
    line names. Returns EXIT_CRASH."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    where = None
    for folder in (log_dir, Path(tempfile.gettempdir())):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            where = folder / f"crash_{name}_{time.strftime('%Y%m%d-%H%M%S')}.log"
            where.write_text(text, encoding="utf-8")
            break
        except OSError:
            where = None
    what = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:400]
    print(f"error: {name} crashed: {what} (an unexpected error, not retried; "
          f"{f'the traceback is in {where}' if where else 'traceback:'})", file=sys.stderr)
    if where is None:
        print(text, file=sys.stderr)
    return EXIT_CRASH
