"""Stage 4: oracle labels on a seeded subset: P0's responses (calibration) and the targets' (validation).

The oracle is a stronger model asked the judge's question with the judge's prompt and read by
the judge's code (judging.py, backends/scorers.py, scoring.py): in the embedded default
Gemma 3 270M in process, in production an API model.

The label is the oracle's deterministic answer: its most likely digit (through an API: the digit
it answers at temperature 0) on [0, 1], not the expected value under its digit distribution. A
label is what an oracle *says*, as a human rater would.

Which units get a label is a seeded hash threshold, decided by the run seed (``run.json``) and
the unit alone: a response is labeled when ``unit_seed(run_seed, "oracle-calibration", prompt_id)``
(base policy) or ``unit_seed(run_seed, "oracle-validation", policy, prompt_id)`` (each target),
a 63-bit number, is below ``fraction * 2**63`` rounded down. Each unit is so labeled with
probability exactly the configured fraction (to 63 bits); the count is Binomial(n, fraction), not
a fixed round(fraction * n). A unit's fate does not depend on which other prompts are in the run:
the labeled set of a smaller run is the labeled set of a larger run with the same seed restricted
to the smaller run's prompts, and a resumed or repeated run labels exactly the same units.

The two splits have their own work files and their own unit keys (``calibration/<prompt>/<policy>``,
``validation/<prompt>/<policy>``), so neither pass can ever take the other's work for its own.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict
from itertools import chain

from ..config import Config
from ..files import ORACLE_LABELS, RESPONSES, usage_file
from ..fingerprint import api_keys
from ..records import OracleLabel, Response
from ..store import read_jsonl, write_json
from ..backends.scorers import ScoringUnit, Tally, open_scorer
from ..judging import Judgement, rubric_digest
from ..rubrics import RUBRICS
from .scoring import report, score_units, stage_inputs, unit_input
from .units import (finish, load_prompts, read_run_seed, refuse_if_overlap_low, refuse_if_too_many_excluded,
                    run_identity, stop_on_api_errors, unit_seed, unit_work, written_bytes)

ORACLE_USAGE = usage_file("oracle")
OUTPUTS = [ORACLE_LABELS, ORACLE_USAGE]
SPLITS = ("calibration", "validation")


def fingerprint(config: Config, args, ck: dict) -> dict:
    return {**run_identity(ck), **api_keys(config, "oracle"),
            "oracle.rubric_digest": rubric_digest(RUBRICS[config.oracle.rubric])}


def inputs(config: Config, args, ck: dict) -> dict:
    return stage_inputs(ck)


def labeled(run_seed: int, fraction: float, *unit: str) -> bool:
    """Whether the unit's seeded hash falls below the fraction (see the module docstring)."""
    return unit_seed(run_seed, *unit) < int(fraction * 2**63)


def select_units(config: Config, responses: list[Response], run_seed: int) -> dict[str, list[Response]]:
    """The responses to label, per split, in the order of responses.jsonl (prompt order)."""
    base, o = config.base_policy, config.oracle
    return {"calibration": [r for r in responses if r.policy == base and
                            labeled(run_seed, o.calibration_fraction, "oracle-calibration", r.prompt_id)],
            "validation": [r for r in responses if r.policy in config.target_policies and
                           labeled(run_seed, o.validation_fraction, "oracle-validation", r.policy, r.prompt_id)]}


def split_key(split: str, r: Response) -> str:
    return f"{split}/{r.prompt_id}/{r.policy}"


def unit_count(config: Config, n_prompts: int) -> int:
    """Its expected count: the calibration share of the base's responses, the validation share of
    the targets'."""
    o = config.oracle
    return round(n_prompts * o.calibration_fraction + n_prompts * len(config.target_policies) * o.validation_fraction)


def disk_estimate(config: Config, n_prompts: int) -> int:
    return written_bytes(n_prompts * len(config.policies), 1000)


def run(config: Config, args, fp: dict) -> dict:
    data_dir = config.data_dir
    prompts = {p.prompt_id: p.prompt for p in load_prompts(data_dir)}
    responses = read_jsonl(data_dir / RESPONSES, Response)
    selected = select_units(config, responses, read_run_seed(data_dir))
    units = {s: [ScoringUnit(split_key(s, r), r.prompt_id, r.policy, prompts[r.prompt_id], r.response)
                 for r in selected[s]] for s in SPLITS}
    keys = {s: [u.key for u in units[s]] for s in SPLITS}
    with ExitStack() as open_works:
        works = {s: open_works.enter_context(unit_work("oracle", config, fp, {u.key: unit_input(u) for u in units[s]},
                                                       name=f"oracle_{s}")) for s in SPLITS}
        todo = {s: [u for u in units[s] if not works[s].settled(u.key)] for s in SPLITS}
        print(f"[oracle] {len(keys['calibration'])} calibration labels ({config.base_policy}), "
              f"{len(keys['validation'])} validation labels ({', '.join(config.target_policies)}); "
              f"{sum(len(keys[s]) - len(todo[s]) for s in SPLITS)} already done; oracle: "
              f"{config.oracle.provider} {config.oracle.model}")

        def labeller(split: str):
            def record(u: ScoringUnit, j: Judgement) -> OracleLabel:
                return OracleLabel(prompt_id=u.prompt_id, policy=u.policy, split=split, label=j.score, raw=j.raw,
                                   input_digest=unit_input(u), model=j.model)
            return record

        if any(todo.values()):
            refuse_if_too_many_excluded("oracle", data_dir, ["generate", "logprobs", "judge"], len(prompts),
                                        config.validation.max_excluded_fraction)
            refuse_if_overlap_low("oracle", config)
        started = time.monotonic()
        tally = Tally()
        with open_scorer(config, "oracle", "oracle", read_run_seed(data_dir), need_distribution=False) as scorer:
            try:
                with stop_on_api_errors("oracle", *chain.from_iterable((works[s], keys[s]) for s in SPLITS)):
                    for s in SPLITS:
                        score_units("oracle", scorer, works[s], todo[s], labeller(s), tally, desc=s)
            finally:
                report("oracle", scorer, sum(len(t) for t in todo.values()), tally, time.monotonic() - started)
                usage = write_json(data_dir / ORACLE_USAGE, asdict(scorer.usage(tally.failed)))

        labels = finish("oracle", data_dir, list(works.values()),
                        {ORACLE_LABELS: [k for s in SPLITS for k in keys[s]]})
        return {**labels, ORACLE_USAGE: usage}
