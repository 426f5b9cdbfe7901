"""Stage 2b: the base policy's response teacher-forced under every policy (itself too), and
each policy's own responses teacher-forced under itself as a check on its propensities.

log p(response | prompt) under a policy = the sum over the response's tokens of
log softmax(logits / T_policy), the prompt rendered with that policy's chat template and
system prompt exactly as at generation.

The same event for numerator and denominator, defined once in ope_prep/events.py: a policy with
the base's tokenizer scores the sampled token ids, whole, with their stop; a policy with another
tokenizer scores the response's text (the text, then the stop; or, cut at max_tokens, "begins with
these bytes"), and so does the base policy, in a unit of its own (`<prompt>/<base>/text`, written
to base_text_logprobs.jsonl), for those targets' weights. A text's probability is the sum over the
token sequences that spell it, found by a beam search (text_probability.py).

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
from ..events import Lattice, NoSharedEvent, TextEvent, cross_tokenizer_models, text_event, tokens_event
from ..files import BASE_TEXT_LOGPROBS, LOGPROBS, OVERLAP, RESPONSES, SELF_CONSISTENCY, usage_file
from ..fingerprint import flatten, policies_keys
from ..text_probability import TextScore, TextSearch, score_texts
from ..records import Prompt, Response, SelfCheck, TeacherForced, UsageTotals
from ..store import WorkFile, failed_row, input_digest, ok_row, read_jsonl, write_json
from .units import (BYTES_PER_TOKEN, SELF_CHECKS_PER_POLICY, exception_row, finish, load_prompts,
                    low_overlap_targets, progress, run_identity, self_check_prompts,
                    stop_on_api_errors, unit_key, unit_work, upstream_digests, written_bytes)

LOGPROBS_USAGE = usage_file("logprobs")
OUTPUTS = [LOGPROBS, BASE_TEXT_LOGPROBS, SELF_CONSISTENCY, OVERLAP, LOGPROBS_USAGE]

PROMPTS_PER_CALL = 16   # prompts whose units are scored (and made durable) together
TF_SEQUENCES = 4        # sequences in flight per model; each has the model's n_ctx cells


def fingerprint(config: Config, args, ck: dict) -> dict:
    return {**run_identity(ck), **policies_keys(config), **flatten(config.text_event.model_dump(), "text_event."),
            "scored_event": "tokens under the base's tokenizer; the text's probability under another"}


def inputs(config: Config, args, ck: dict) -> dict:
    return upstream_digests(ck, ["prepare", "generate"])


def self_key(prompt_id: str, policy: str) -> str:
    return unit_key(prompt_id, policy) + "/self"


def text_key(prompt_id: str, policy: str) -> str:
    """The base policy's unit of the text event (for the targets with another tokenizer)."""
    return unit_key(prompt_id, policy) + "/text"


# ---- the stage ------------------------------------------------------------------------------

def unit_count(config: Config, n_prompts: int) -> int:
    """Every response teacher-forced, each policy's self-checks, and the base's text events when
    policies use more than one model (their tokenizers may differ)."""
    p = len(config.policies)
    texts = n_prompts if len({pol.model for pol in config.policies}) > 1 else 0
    return n_prompts * p + p * min(n_prompts, SELF_CHECKS_PER_POLICY) + texts


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
    text_models: set[str]                 # model keys whose tokenizer is not the base's
    tf_keys: list[str]
    self_keys: list[str]
    text_keys: list[str]                  # the base policy's text-event units (none: one tokenizer)
    inputs: dict[str, str]


def plan_units(config: Config, prompts: list[Prompt], responses: list[Response], text_models: set[str]) -> LogprobUnits:
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
    texts = {text_key(pid, base): tf[unit_key(pid, base)] for pid in pids} if text_models else {}
    return LogprobUnits(prompts, by_unit, checked, text_models, list(tf), list(own), list(texts),
                        {**tf, **own, **texts})


def run(config: Config, args, fp: dict) -> dict:
    data_dir = config.data_dir
    tokenizers, vocab = policy_tokenizers(config)
    base_model = config.policy(config.base_policy).model
    units = plan_units(config, load_prompts(data_dir), read_jsonl(data_dir / RESPONSES, Response),
                       cross_tokenizer_models(base_model, vocab))
    all_keys = units.tf_keys + units.self_keys + units.text_keys
    with unit_work("logprobs", config, fp, units.inputs) as work:
        todo_total = sum(not work.settled(k) for k in all_keys)
        print(f"[logprobs] {len(units.tf_keys)} teacher-forced log-probabilities, {len(units.text_keys)} of the "
              f"base's text, and {len(units.self_keys)} self-checks, {len(all_keys) - todo_total} already done")
        event = _event_of(units.responses, config.base_policy, tokenizers[base_model])
        usage: dict[str, dict] = {}
        with progress("logprobs", todo_total, "seq") as bar, stop_on_api_errors("logprobs", work, all_keys):
            for model_key in dict.fromkeys(p.model for p in config.policies):
                spent = _score_model(config, model_key, units, event, work, bar)
                if spent is not None:
                    usage[model_key] = asdict(spent)
        usage_manifest = write_json(data_dir / LOGPROBS_USAGE, usage)
        manifests = finish("logprobs", data_dir, [work], {LOGPROBS: units.tf_keys, SELF_CONSISTENCY: units.self_keys,
                                                          BASE_TEXT_LOGPROBS: units.text_keys})
    figures = overlap_figures(config, read_jsonl(data_dir / LOGPROBS, TeacherForced),
                              read_jsonl(data_dir / BASE_TEXT_LOGPROBS, TeacherForced))
    print_overlap(config, figures)
    return {**manifests, OVERLAP: write_json(data_dir / OVERLAP, {"base_policy": config.base_policy, "targets": figures}),
            LOGPROBS_USAGE: usage_manifest}


def _event_of(responses: dict, base: str, base_tok) -> Callable[[str], Union[TextEvent, NoSharedEvent]]:
    """prompt id -> the text event of its base response (events.py), each computed once; a
    response without one gets its NoSharedEvent."""
    events: dict[str, Union[TextEvent, NoSharedEvent]] = {}

    def event(pid: str) -> Union[TextEvent, NoSharedEvent]:
        if pid not in events:
            try:
                events[pid] = text_event(responses[(pid, base)], base_tok)
            except NoSharedEvent as e:
                events[pid] = e
        return events[pid]
    return event


def _unit_keys(pid: str, pol, units: LogprobUnits, base: str) -> list[str]:
    keys = [unit_key(pid, pol.name), self_key(pid, pol.name)]
    return keys + [text_key(pid, base)] if pol.name == base and units.text_keys else keys


def _score_model(config: Config, model_key: str, units: LogprobUnits, event, work: WorkFile, bar) -> Optional[UsageTotals]:
    """Score one model's policies' units not yet settled, PROMPTS_PER_CALL prompts at a time, each
    batch saved as it is done; None when it had none to do."""
    policies = [pol for pol in config.policies if pol.model == model_key]
    wanted = set(units.inputs)
    todo = [p for p in units.prompts if any(k in wanted and not work.settled(k) for pol in policies
                                            for k in _unit_keys(p.prompt_id, pol, units, config.base_policy))]
    if not todo:
        return None
    bar.set_description(f"[logprobs] {model_key}")
    model = policy_model(config, model_key, TF_SEQUENCES, "logprobs")
    lattice = Lattice(model.chat) if model_key in units.text_models or units.text_keys else None
    tokens, started = 0, time.perf_counter()
    try:
        for i in range(0, len(todo), PROMPTS_PER_CALL):
            rows = _score_prompts(config, model, model_key, todo[i:i + PROMPTS_PER_CALL], policies,
                                  units, event, work, lattice)
            work.append(rows)
            tokens += sum(r["record"]["n_tokens"] for r in rows if r["status"] == "ok" and "n_tokens" in r["record"])
            bar.update(len(rows))
        return replace(model_usage(model, tokens), seconds=round(time.perf_counter() - started, 3))
    finally:
        model.close()


def overlap_figures(config: Config, records: list[TeacherForced], base_texts: list[TeacherForced]) -> dict[str, dict]:
    """Each target's overlap with the base policy's responses (diagnostics.overlap), over the
    prompts scored under both: known before any judge or oracle call is paid. A target's weight
    divides by the base's record of the same event (its text event for a text record)."""
    by_unit = {(r.prompt_id, r.policy): r for r in records}
    text_of = {r.prompt_id: r for r in base_texts}
    base = config.base_policy

    def denominator(tr: TeacherForced) -> Optional[TeacherForced]:
        return text_of.get(tr.prompt_id) if tr.event == "text" else by_unit.get((tr.prompt_id, base))

    figures = {}
    for t in config.target_policies:
        scored = [(tr, denominator(tr)) for (pid, pol), tr in by_unit.items() if pol == t and denominator(tr)]
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
                   units: LogprobUnits, event, work: WorkFile, lattice: Optional[Lattice]) -> list[dict]:
    """One call's units of one model: rows for the work file (ok or failed)."""
    rows: list[dict] = []
    calls: dict[str, list[tuple]] = {"targets": [], "clone": [], "self": []}   # -> (item, unit)
    texts: list[tuple] = []                                                     # -> (job, unit)
    stop_tokens = model.chat.end_of_generation_tokens()
    base = config.base_policy
    other_tokenizer = model_key in units.text_models
    for p in prompts:
        pid, resp = p.prompt_id, units.responses[(p.prompt_id, base)]
        for pol in policies:
            prompt = model.chat.prompt_tokens(pol.system_prompt, p.prompt)
            key = unit_key(pid, pol.name)
            if not other_tokenizer and not work.settled(key):
                call = "clone" if pol.name == config.clone_policy else "targets"
                tokens, n_bytes = tokens_event(resp, model.chat)
                calls[call].append(((prompt, tokens, pol.temperature, stop_tokens if resp.finish_reason == "stop" else None),
                                    (key, p, pol, n_bytes)))
            text_units = [key] if other_tokenizer else []
            text_units += [text_key(pid, base)] if pol.name == base and units.text_keys else []
            for tkey in (k for k in text_units if not work.settled(k)):
                ev = event(pid)
                if isinstance(ev, NoSharedEvent):
                    rows.append(failed_row(tkey, str(ev), certain=True, prompt_id=pid))
                    continue
                seeds = ([ev.sampled] if pol.name == base else []) + [lattice.spell(ev.text)]
                search = TextSearch(lattice, ev, stop_tokens, seeds, config.text_event.beam_width,
                                    config.text_event.explore_share)
                texts.append(((prompt, pol.temperature, search), (tkey, p, pol, ev)))
            skey = self_key(pid, pol.name)
            if pid in units.checked[pol.name] and not work.settled(skey):
                own = units.responses[(pid, pol.name)]
                calls["self"].append(((prompt, own.token_ids, pol.temperature,
                                       stop_tokens if own.finish_reason == "stop" else None), (skey, p, pol, None)))
    for pairs in calls.values():
        if pairs:
            results = model.teacher_force_many([item for item, _ in pairs])
            rows += [_tokens_row(unit, item[1], values) for (item, unit), values in zip(pairs, results)]
    if texts:
        results = score_texts(model, [job for job, _ in texts])
        rows += [_text_row(unit, model, score) for (_, unit), score in zip(texts, results)]
    return rows


def _tokens_row(unit: tuple, tokens: list[int], values) -> dict:
    """The work-file row of a teacher-forced token sequence (a self-check when n_bytes is None)."""
    key, p, pol, n_bytes = unit
    if isinstance(values, Exception):   # too long for the context, a request that failed
        return exception_row(key, values, p.prompt_id)
    total = math.fsum(values)
    if not math.isfinite(total) or any(v > 0 for v in values):
        return failed_row(key, f"invalid log-probability {total!r} (positive or NaN)", certain=True, prompt_id=p.prompt_id)
    if n_bytes is None:
        return ok_row(key, SelfCheck(prompt_id=p.prompt_id, policy=pol.name, token_logprobs=list(values)))
    return ok_row(key, TeacherForced(prompt_id=p.prompt_id, policy=pol.name, logprob=total, n_tokens=len(tokens),
                                     token_ids=list(tokens), token_logprobs=list(values),
                                     scored_bytes=n_bytes, complete=True))


def _text_row(unit: tuple, model: PolicyModel, score: Union[TextScore, Exception]) -> dict:
    key, p, pol, ev = unit
    if isinstance(score, Exception):
        return exception_row(key, score, p.prompt_id)
    if not math.isfinite(score.logprob) or score.logprob > 0:
        return failed_row(key, f"invalid log-probability {score.logprob!r} (positive or NaN)", certain=True,
                          prompt_id=p.prompt_id)
    best = score.paths[0] + ([model.chat.end_of_turn] if ev.stops else [])
    return ok_row(key, TeacherForced(
        prompt_id=p.prompt_id, policy=pol.name, logprob=score.logprob, n_tokens=len(best), token_ids=best,
        token_logprobs=score.best_token_logprobs, scored_bytes=len(ev.text), complete=ev.whole, event="text",
        paths=score.paths, path_logprobs=score.path_logprobs, crossing_logprob=score.crossing_logprob,
        dropped_bound=score.dropped_bound))
