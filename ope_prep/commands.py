"""The runner commands that messages tell the user to paste: the run's own N, its config file,
and the flags that redo what the message is about."""

from __future__ import annotations

import json
import shlex

from .files import RUN_PARAMS, RUN_STATE
from .stages import STAGES


def run_command(config, *flags: str) -> str:
    """The runner's command for this run, right to paste: the run's own N (the runner's target,
    else stage 1's, from run.json), this config file, and ``flags``."""
    n = "N"
    for name in (RUN_STATE, RUN_PARAMS):
        try:
            n = str(int(json.loads((config.data_dir / name).read_text(encoding="utf-8"))["samples"]))
            break
        except (OSError, ValueError, KeyError, TypeError):
            pass      # no run yet (or a damaged record, which stage 5 reports): N is for the user
    return " ".join(["python run_pipeline.py", n, "--config", shlex.quote(str(config.config_path)),
                     *map(shlex.quote, flags)])


def rerun_command(config, stage: str) -> str:
    """The command that redoes ``stage`` and the stages after it for this run."""
    return run_command(config, "--force-step", stage)


def stage_command(config, stage: str) -> str:
    """The numbered script of ``stage`` with this config: run without --force, it updates a stage
    whose inputs changed, keeping every unit whose own inputs are unchanged."""
    script = dict(STAGES)[stage]
    return f"python {script} --config {shlex.quote(str(config.config_path))}"
