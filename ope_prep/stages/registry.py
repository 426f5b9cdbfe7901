"""Each stage's module, behind one interface (`Stage`): what the runner (runner.py), --status and
--plan ask of a stage."""

from __future__ import annotations

from typing import Protocol


class Stage(Protocol):
    """What the runner (runner.py), --status and --plan ask of a stage module. Optional: a stage
    may also have ``cli_keys(args)`` (fingerprint key -> the flag that sets it), ``read_only(config,
    args)`` (flags answered without the data dir) and ``run_size(config, args)`` (the prompts the
    run has once it is done, when the stage itself decides that)."""

    OUTPUTS: list[str]      # its files and folders in the data dir (moved aside by --force)

    def fingerprint(self, config, args, ck: dict) -> dict:
        """The config its work belongs to: a change is refused."""

    def inputs(self, config, args, ck: dict) -> dict:
        """What it read: a change redoes it, keeping finished units."""

    def run(self, config, args, fp: dict) -> dict:
        """Do the work; returns the manifests of OUTPUTS written."""

    def unit_count(self, config, n_prompts: int) -> int:
        """Units it does for a run of n_prompts (the oracle's: its expected count)."""

    def disk_estimate(self, config, n_prompts: int) -> int:
        """Bytes it may write for a run of n_prompts, generously."""


def stage_module(name: str) -> Stage:
    """The module of stage `name` (imported here, on first use: the scripts import only this)."""
    from . import generate, judge, logprobs, oracle, prepare, summarize
    modules = {"prepare": prepare, "generate": generate, "logprobs": logprobs, "judge": judge,
               "oracle": oracle, "summarize": summarize}
    return modules[name]
