"""Stage 3: a judge score for every (prompt, policy) response.

The judge's prompt and the reading of its answer are in judging.py, its scorers in
backends/scorers.py, the scoring loop in scoring.py (all shared with the oracle). Each unit is
saved as it is done; a rerun scores only what is missing or failed.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from ..config import Config
from ..files import JUDGE_SCORES, RESPONSES, usage_file
from ..fingerprint import api_keys
from ..records import JudgeScore, Response
from ..store import read_jsonl, write_json
from ..backends.scorers import ScoringUnit, Tally, open_scorer
from ..judging import Judgement, rubric_digest
from ..rubrics import RUBRICS
from .scoring import report, score_units, stage_inputs, unit_input
from .units import (finish, load_prompts, read_run_seed, refuse_if_overlap_low, refuse_if_too_many_excluded,
                    run_identity, stop_on_api_errors, unit_key, unit_work, written_bytes)

JUDGE_USAGE = usage_file("judge")
OUTPUTS = [JUDGE_SCORES, JUDGE_USAGE]


def fingerprint(config: Config, args, ck: dict) -> dict:
    return {**run_identity(ck), **api_keys(config, "judge"),
            "judge.rubric_digest": rubric_digest(RUBRICS[config.judge.rubric])}


def inputs(config: Config, args, ck: dict) -> dict:
    return stage_inputs(ck)


def unit_count(config: Config, n_prompts: int) -> int:
    return n_prompts * len(config.policies)


def disk_estimate(config: Config, n_prompts: int) -> int:
    return written_bytes(unit_count(config, n_prompts), 1000)


def run(config: Config, args, fp: dict) -> dict:
    data_dir = config.data_dir
    prompts = {p.prompt_id: p.prompt for p in load_prompts(data_dir)}
    responses = read_jsonl(data_dir / RESPONSES, Response)
    units = [ScoringUnit(unit_key(r.prompt_id, r.policy), r.prompt_id, r.policy, prompts[r.prompt_id], r.response)
             for r in responses]
    keys = [u.key for u in units]

    def record(u: ScoringUnit, j: Judgement) -> JudgeScore:
        return JudgeScore(prompt_id=u.prompt_id, policy=u.policy, score=j.score, mean=j.mean,
                          variance=j.variance, raw=j.raw, input_digest=unit_input(u), model=j.model)

    with unit_work("judge", config, fp, {u.key: unit_input(u) for u in units}) as work:
        todo = [u for u in units if not work.settled(u.key)]
        print(f"[judge] {len(keys)} responses, {len(keys) - len(todo)} already scored; judge: "
              f"{config.judge.provider} {config.judge.model}, rubric {config.judge.rubric}")
        if todo:
            refuse_if_too_many_excluded("judge", data_dir, ["generate", "logprobs"], len(prompts),
                                        config.validation.max_excluded_fraction)
            refuse_if_overlap_low("judge", config)
        started = time.monotonic()
        tally = Tally()
        with open_scorer(config, "judge", "judge", read_run_seed(data_dir), need_distribution=True) as scorer:
            try:
                with stop_on_api_errors("judge", work, keys):
                    score_units("judge", scorer, work, todo, record, tally)
            finally:
                report("judge", scorer, len(todo), tally, time.monotonic() - started)
                usage = write_json(data_dir / JUDGE_USAGE, asdict(scorer.usage(tally.failed)))
        return {**finish("judge", data_dir, [work], {JUDGE_SCORES: keys}), JUDGE_USAGE: usage}
