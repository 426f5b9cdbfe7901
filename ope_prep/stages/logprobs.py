"""Stage 2b: the base policy's response teacher-forced under every policy (itself too), and
each policy's own responses teacher-forced under itself as a check on its propensities.

log p(response | prompt) under a policy = the sum over the response's tokens of
log softmax(logits / T_policy), the prompt rendered with that policy's chat template and
system prompt exactly as at generation.

The same event for every policy: a weight's numerator and denominator are probabilities of
the same event, defined once in ope_prep/events.py (a whole response and its stop, or a prefix
every tokenizer shares; the stop is any of a model's end-of-generation tokens). The records say
how many bytes were scored (`scored_bytes`, `complete`). A response with no such event is a
failed unit (quarantined with the reason), never a weight of 1.

Passes of their own. Units are scored PROMPTS_PER_CALL prompts per `teacher_force_many` call
(packed sequences, shared prompt prefixes, logits at response positions only). The clone
policy's units go in a call of their own, so its log-weight of 0 is computed, not copied from
the base policy's decode; the self-checks (SELF_CONSISTENCY: the chosen prompts' responses of
each policy under itself, see units.self_check_prompts) go in another.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Union

import numpy as np

from .. import diagnostics as dx
from ..backends.providers import PolicyModel, model_usage, policy_model, policy_tokenizers
from ..config import Config
from ..events import NoSharedEvent, ScoredEvent, scored_event
from ..files import LOGPROBS, OVERLAP, RESPONSES, SELF_CONSISTENCY, usage_file
from ..fingerprint import policies_keys
from ..records import Prompt, Response, SelfCheck, TeacherForced, UsageTotals
from ..store import WorkFile, failed_row, input_digest, ok_row, read_jsonl, write_json
from .units import (BYTES_PER_TOKEN, SELF_CHECKS_PER_POLICY, exception_row, finish, load_prompts,
                    low_overlap_targets, progress, run_identity, self_check_prompts,
                    stop_on_api_errors, unit_key, unit_work, upstream_digests, written_bytes)

LOGPROBS_USAGE = usage_file("logprobs")
OUTPUTS = [LOGPROBS, SELF_CONSISTENCY, OVERLAP, LOGPROBS_USAGE]

PROMPTS_PER_CALL = 16   # prompts whose units are scored (and made durable) together
TF_SEQUENCES = 4        # sequences in flight per model; each has the model's n_ctx cells


def fingerprint(config: Config, args, ck: dict) -> dict:
    return {**run_identity(ck), **policies_keys(config)}


def inputs(config: Config, args, ck: dict) -> dict:
    return upstream_digests(ck, ["prepare", "generate"])


def self_key(prompt_id: str, policy: str) -> str:
    return unit_key(prompt_id, policy) + "/self"


# ---- the stage ------------------------------------------------------------------------------

def unit_count(config: Config, n_prompts: int) -> int:
    """Every response teacher-forced, and each policy's self-checks."""
    p = len(config.policies)
    return n_prompts * p + p * min(n_prompts, SELF_CHECKS_PER_POLICY)


def disk_estimate(config: Config, n_prompts: int) -> int:
    per_token = BYTES_PER_TOKEN * config.generation.max_tokens
    return written_bytes(n_prompts * len(config.policies), 2 * (per_token + 500))


@dataclass
class LogprobUnits:
    """What stage 2b scores: the prompts whose base response exists, each response by (prompt,
    policy), which prompts each policy self-checks, the unit keys, and each unit's input digest."""
    prompts: list[Prompt]
    responses: dict[tuple[str, str], Response]
    checked: dict[str, set[str]]          # policy -> its self-checked prompt ids
    tf_keys: list[str]
    self_keys: list[str]
    inputs: dict[str, str]


def plan_units(config: Config, prompts: list[Prompt], responses: list[Response]) -> LogprobUnits:
    """The self-checks are chosen among all the run's prompts (as stage 5 does). A prompt whose
    base response was quarantined in stage 2 has nothing to score (it is left out of the
    dataset); a policy's quarantined response has no self-check."""
    base = config.base_policy
    by_unit = {(r.prompt_id, r.policy): r for r in responses}
    all_pids = [p.prompt_id for p in prompts]
    prompts = [p for p in prompts if (p.prompt_id, base) in by_unit]
    pids = [p.prompt_id for p in prompts]
    checked = {pol.name: {pid for pid in self_check_prompts(all_pids)
                          if (pid, base) in by_unit and (pid, pol.name) in by_unit}
               for pol in config.policies}
    text = {p.prompt_id: p.prompt for p in prompts}
    tf = {unit_key(pid, pol.name): input_digest(text[pid], asdict(by_unit[(pid, base)]))
          for pid in pids for pol in config.policies}
    own = {self_key(pid, pol.name): input_digest(text[pid], asdict(by_unit[(pid, pol.name)]))
           for pid in pids for pol in config.policies if pid in checked[pol.name]}
    return LogprobUnits(prompts, by_unit, checked, list(tf), list(own), {**tf, **own})


def run(config: Config, args, fp: dict) -> dict:
    data_dir = config.data_dir
    units = plan_units(config, load_prompts(data_dir), read_jsonl(data_dir / RESPONSES, Response))
    all_keys = units.tf_keys + units.self_keys
    with unit_work("logprobs", config, fp, units.inputs) as work:
        todo_total = sum(not work.settled(k) for k in all_keys)
        print(f"[logprobs] {len(units.tf_keys)} teacher-forced log-probabilities and {len(units.self_keys)} "
              f"self-checks, {len(all_keys) - todo_total} already done")
        event = _event_of(config, units.responses)
        usage: dict[str, dict] = {}
        with progress("logprobs", todo_total, "seq") as bar, stop_on_api_errors("logprobs", work, all_keys):
            for model_key in dict.fromkeys(p.model for p in config.policies):
                spent = _score_model(config, model_key, units, event, work, bar)
                if spent is not None:
                    usage[model_key] = asdict(spent)
        usage_manifest = write_json(data_dir / LOGPROBS_USAGE, usage)
        manifests = finish("logprobs", data_dir, [work], {LOGPROBS: units.tf_keys, SELF_CONSISTENCY: units.self_keys})
    figures = overlap_figures(config, read_jsonl(data_dir / LOGPROBS, TeacherForced))
    print_overlap(config, figures)
    return {**manifests, OVERLAP: write_json(data_dir / OVERLAP, {"base_policy": config.base_policy, "targets": figures}),
            LOGPROBS_USAGE: usage_manifest}


def _event_of(config: Config, responses: dict) -> Callable[[str], Union[ScoredEvent, NoSharedEvent]]:
    """prompt id -> the event every policy scores for its base response (events.py), each
    computed once; a response without one gets its NoSharedEvent."""
    base, base_model = config.base_policy, config.policy(config.base_policy).model
    tokenizers, vocab = policy_tokenizers(config)
    events: dict[str, Union[ScoredEvent, NoSharedEvent]] = {}

    def event(pid: str) -> Union[ScoredEvent, NoSharedEvent]:
        if pid not in events:
            try:
                events[pid] = scored_event(responses[(pid, base)], base_model, tokenizers, vocab)
            except NoSharedEvent as e:
                events[pid] = e
        return events[pid]
    return event


def _score_model(config: Config, model_key: str, units: LogprobUnits, event, work: WorkFile, bar) -> Optional[UsageTotals]:
    """Score one model's policies' units not yet settled, PROMPTS_PER_CALL prompts at a time, each
    batch saved as it is done; None when it had none to do."""
    policies = [pol for pol in config.policies if pol.model == model_key]
    wanted = set(units.inputs)
    todo = [p for p in units.prompts if any(k in wanted and not work.settled(k) for pol in policies
                                            for k in (unit_key(p.prompt_id, pol.name), self_key(p.prompt_id, pol.name)))]
    if not todo:
        return None
    bar.set_description(f"[logprobs] {model_key}")
    model = policy_model(config, model_key, TF_SEQUENCES, "logprobs")
    tokens, started = 0, time.perf_counter()
    try:
        for i in range(0, len(todo), PROMPTS_PER_CALL):
            rows = _score_prompts(config, model, model_key, todo[i:i + PROMPTS_PER_CALL], policies,
                                  units.responses, event, units.checked, work)
            work.append(rows)
            tokens += sum(r["record"]["n_tokens"] for r in rows if r["status"] == "ok" and "n_tokens" in r["record"])
            bar.update(len(rows))
        return replace(model_usage(model, tokens), seconds=round(time.perf_counter() - started, 3))
    finally:
        model.close()


def overlap_figures(config: Config, records: list[TeacherForced]) -> dict[str, dict]:
    """Each target's overlap with the base policy's responses (diagnostics.overlap), over the
    prompts scored under both: known before any judge or oracle call is paid."""
    by_unit = {(r.prompt_id, r.policy): r for r in records}
    base = config.base_policy
    figures = {}
    for t in config.target_policies:
        scored = [(by_unit[(pid, t)], by_unit[(pid, base)]) for (pid, pol) in by_unit if pol == t and (pid, base) in by_unit]
        if scored:
            figures[t] = dx.overlap(np.array([tr.logprob for tr, _ in scored]), np.array([br.logprob for _, br in scored]),
                                    np.array([tr.n_tokens for tr, _ in scored]))
    return figures


def print_overlap(config: Config, figures: dict[str, dict]) -> None:
    print(f"[logprobs] overlap with {config.base_policy}'s responses, before any judge or oracle call:")
    width = max((len(t) for t in figures), default=0)
    for t, f in figures.items():
        print(f"[logprobs]   {t:<{width}}  ESS {f['ess_fraction']:6.1%} of {f['n']}  "
              f"max weight share {f['max_weight_share']:5.1%}  log w q99 {f['log_weight']['q99']:8.3g}  "
              f"typicality coverage {f['typicality_coverage']:.2f}")
    low = low_overlap_targets(config, figures)
    for why in low:
        print(f"[logprobs] warning: {why}")
    if low:
        then = ("stages 3 and 4 will refuse to start (validation.on_low_overlap: stop)"
                if config.validation.on_low_overlap == "stop" else
                "the judge and oracle go on (validation.on_low_overlap: warn); stage 5 notes it")
        print(f"[logprobs] {then}")


def _score_prompts(config: Config, model: PolicyModel, model_key: str, prompts: list, policies: list,
                   responses: dict, event, checked: dict, work: WorkFile) -> list[dict]:
    """One call's units of one model: rows for the work file (ok or failed)."""
    rows: list[dict] = []
    calls: dict[str, list[tuple]] = {"targets": [], "clone": [], "self": []}   # -> (item, unit)
    stop_tokens = model.chat.end_of_generation_tokens()
    for p in prompts:
        for pol in policies:
            prompt = model.chat.prompt_tokens(pol.system_prompt, p.prompt)
            key = unit_key(p.prompt_id, pol.name)
            if not work.settled(key):
                ev = event(p.prompt_id)
                if isinstance(ev, NoSharedEvent):
                    rows.append(failed_row(key, str(ev), certain=True, prompt_id=p.prompt_id))
                else:
                    call = "clone" if pol.name == config.clone_policy else "targets"
                    calls[call].append(((prompt, ev.tokens[model_key], pol.temperature,
                                         stop_tokens if ev.stops else None), (key, p, pol, ev)))
            skey = self_key(p.prompt_id, pol.name)
            if p.prompt_id in checked[pol.name] and not work.settled(skey):
                own = responses[(p.prompt_id, pol.name)]
                calls["self"].append(((prompt, own.token_ids, pol.temperature,
                                       stop_tokens if own.finish_reason == "stop" else None), (skey, p, pol, None)))
    for pairs in calls.values():
        if not pairs:
            continue
        results = model.teacher_force_many([item for item, _ in pairs])
        for ((_, tokens, *_), (key, p, pol, ev)), values in zip(pairs, results):
            if isinstance(values, Exception):   # too long for the context, a request that failed
                rows.append(exception_row(key, values, p.prompt_id))
                continue
            total = math.fsum(values)
            if not math.isfinite(total) or any(v > 0 for v in values):
                rows.append(failed_row(key, f"invalid log-probability {total!r} (positive or NaN)",
                                       certain=True, prompt_id=p.prompt_id))
                continue
            if ev is None:
                record = SelfCheck(prompt_id=p.prompt_id, policy=pol.name, token_logprobs=list(values))
            else:
                record = TeacherForced(prompt_id=p.prompt_id, policy=pol.name, logprob=total,
                                       n_tokens=len(tokens), token_ids=list(tokens), token_logprobs=list(values),
                                       scored_bytes=ev.scored_bytes, complete=ev.complete)
            rows.append(ok_row(key, record))
    return rows
