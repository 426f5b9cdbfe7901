"""Stage 5's propensity rules: each a `check_<rule>(config, data, problems)` that adds its fatal
problems and returns its figures for dataset_info.json's "checks"; `PROPENSITY_CHECKS` runs
them in order. A new rule is one function and one entry in that list.

* clone: pi_clone's log-weight (teacher-forced under pi_clone minus under the base policy, each
  from a pass of its own in stage 2b) within ``validation.clone_tolerance`` of 0;
* scored_events: every teacher-forced record scores the very event its base response defines
  (ope_prep/events.py): under a model with the base's tokenizer the sampled token ids, whole; under
  another, the response's text: each path spells it (all of it, when it stopped), the best path
  first, the same `scored_bytes` and `complete`. The base policy's text-event record holds the
  split it sampled, valued as its token-sequence record values it (the same tokens, the same
  numbers). A record that departs from the definition was damaged or made by other code, and its
  weight is wrong. Recomputed from the base response and each model's tokenizer (no weights);
* exported_weights: every log-weight in the CJE file, target minus base, is the target's own
  (for a text event: the text's probability under the target over the base's);
* tf_vs_sampling: the base policy's response teacher-forced under itself, token by token
  against the log-probability the sampler drew it with;
* self_consistency: every policy's own responses under itself, the same way;
* suspicious: an exact 0.0 on a non-empty response is fatal (a computed 0 is a bug); very low
  per-token values are listed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .backends.providers import policy_tokenizers
from .config import Config
from .dataset import Dataset, Problems, lp_ok, shape_ok
from .events import NoSharedEvent, TextEvent, cross_tokenizer_models, text_event, tokens_event
from .files import BASE_TEXT_LOGPROBS, LOGPROBS, RESPONSES, SELF_CONSISTENCY
from .records import TeacherForced

MAX_LISTED = 100          # suspicious records kept in dataset_info.json


def _where(data: Dataset, name: str, pid: str, pol: str) -> str:
    return f"line {data.lines.get((name, pid, pol))} {pid}/{pol}"


def _prompt_ids(data: Dataset) -> list[str]:
    return [p.prompt_id for p in data.prompts if isinstance(p.prompt_id, str)]


def worst_token(a: list[float], b: list[float]) -> float:
    """The largest per-token |difference| (0 for no tokens)."""
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def value_spread(diffs: list[float]) -> dict:
    d = np.asarray(diffs, dtype=float)
    return {"n": len(d), "max": float(d.max()) if len(d) else None,
            "q99": float(np.quantile(d, 0.99)) if len(d) else None}


def check_clone(config: Config, data: Dataset, problems: Problems) -> dict | None:
    """pi_clone's log-weight must be 0, over the very same tokens."""
    base, clone, tol = config.base_policy, config.clone_policy, config.validation.clone_tolerance
    if clone is None:
        return None
    lws, off = [], []
    for pid in _prompt_ids(data):
        a, b = data.logprobs.get((pid, clone)), data.logprobs.get((pid, base))
        if a is None or b is None or not lp_ok(a.logprob) or not lp_ok(b.logprob):
            continue
        lw = a.logprob - b.logprob
        lws.append(abs(lw))
        if abs(lw) > tol:     # other tokens: the scored-event rule says so
            off.append((abs(lw), f"{_where(data, LOGPROBS, pid, clone)}: log-weight {lw:+.3g}"))
    off.sort(key=lambda t: -t[0])
    problems.rule(LOGPROBS, f"{clone} log-weights depart from 0 by more than clone_tolerance "
                  f"{tol:g} ({clone} is meant to be identical to {base}; largest first)",
                  [s for _, s in off])
    return {"policy": clone, "tolerance": tol, "n": len(lws), "n_over": len(off),
            "max_abs_log_weight": max(lws) if lws else None}


def tokens_mismatch(t: TeacherForced, tokens: list[int], n_bytes: int) -> str | None:
    """How a record of a policy with the base's tokenizer departs from the sampled tokens (None: it does not)."""
    how = []
    if t.event != "tokens":
        how.append(f"event {t.event!r}, the sampled tokens' expected")
    if t.token_ids != tokens:
        if t.token_ids == tokens[:len(t.token_ids)]:
            how.append(f"{len(t.token_ids)} tokens scored, the event has {len(tokens)}")
        else:
            how.append(f"other token ids than the event's {len(tokens)}")
    if t.scored_bytes != n_bytes:
        how.append(f"scored_bytes {t.scored_bytes}, the event's {n_bytes}")
    if t.complete is not True:
        how.append(f"complete {t.complete}, the event's True")
    return ", ".join(how) or None


def text_mismatch(t: TeacherForced, ev: TextEvent, tok, must_hold: list[int] | None = None) -> str | None:
    """How a text-event record departs from the text event `ev` under tokenizer `tok`."""
    if t.event != "text":
        return f"event {t.event!r}, the text's expected"
    how = []
    if t.scored_bytes != len(ev.text):
        how.append(f"scored_bytes {t.scored_bytes}, the event's {len(ev.text)}")
    if t.complete != ev.whole:
        how.append(f"complete {t.complete}, the event's {ev.whole}")
    bad = [i for i, p in enumerate(t.paths)
           if not all(isinstance(x, int) and 0 <= x < tok.n_vocab and tok.is_text_token(x) for x in p)
           or not ev.text.startswith(raw := tok.token_bytes(p)) or (ev.stops and raw != ev.text)]
    if bad:
        how.append(f"path {bad[0]} does not spell the text" + (" whole" if ev.stops else ""))
    if len({tuple(p) for p in t.paths}) != len(t.paths):
        how.append("a path is listed twice")
    if t.token_ids != t.paths[0] + ([tok.end_of_turn] if ev.stops else []):
        how.append("token_ids are not the best path" + (" and the end of turn" if ev.stops else ""))
    if must_hold is not None and must_hold not in t.paths:
        how.append("the split the base sampled is not among its paths")
    return ", ".join(how) or None


def check_scored_events(config: Config, data: Dataset, problems: Problems) -> dict:
    """For each prompt, the base response's events against every policy's record."""
    base = config.base_policy
    base_model = config.policy(base).model
    tokenizers, vocab = policy_tokenizers(config)
    base_tok = tokenizers[base_model]
    cross = cross_tokenizer_models(base_model, vocab)
    stop_tokens = set(base_tok.end_of_generation_tokens())
    tol = config.tf_tolerance(base)
    n, off, no_event, bad_stop, unequal, texts = 0, [], [], [], [], []
    for pid in _prompt_ids(data):
        r = data.responses.get((pid, base))
        if r is None or not shape_ok(r, "sampling_logprob"):
            continue      # reported by the responses' own rules
        if r.finish_reason == "stop" and (not r.token_ids or r.token_ids[-1] not in stop_tokens):
            bad_stop.append(f"{_where(data, RESPONSES, pid, base)}: finish_reason stop, but its last token "
                            f"{r.token_ids[-1] if r.token_ids else None} is no end-of-generation token")
            continue
        tokens, n_bytes = tokens_event(r, base_tok)
        ev = None
        if cross:
            try:
                ev = text_event(r, base_tok)
            except NoSharedEvent as e:
                if any((pid, p.name) in data.logprobs for p in config.policies):
                    no_event.append(f"{_where(data, RESPONSES, pid, base)}: {e}")
                continue
        for pol in config.policies:
            t = data.logprobs.get((pid, pol.name))
            if t is None or not shape_ok(t, "logprob"):
                continue
            n += 1
            if pol.model in cross:
                how = text_mismatch(t, ev, tokenizers[pol.model])
                texts.append(t)
            else:
                how = tokens_mismatch(t, tokens, n_bytes)
            if how:
                off.append(f"{_where(data, LOGPROBS, pid, pol.name)}: {how}")
        bt = data.base_text.get((pid, base))
        if ev is None or bt is None or not shape_ok(bt, "logprob"):
            continue
        how = text_mismatch(bt, ev, base_tok, must_hold=ev.sampled)
        if how:
            off.append(f"{_where(data, BASE_TEXT_LOGPROBS, pid, base)}: {how}")
            continue
        texts.append(bt)
        own = data.logprobs.get((pid, base))
        if ev.whole and own is not None and own.event == "tokens" and lp_ok(own.logprob):
            d = abs(bt.path_logprobs[bt.paths.index(ev.sampled)] - own.logprob)
            if d > tol * max(1, own.n_tokens):
                unequal.append(f"{_where(data, BASE_TEXT_LOGPROBS, pid, base)}: {d:.3g} nats from line "
                               f"{data.lines.get((LOGPROBS, pid, base))} of {LOGPROBS}")
    problems.rule(RESPONSES, f"{base} responses say they stopped but do not end in a stop token", bad_stop)
    problems.rule(LOGPROBS, "prompts have records although their base response has no event to score "
                  "(stage 2b quarantines those)", no_event)
    problems.rule(LOGPROBS, f"records do not score the event of {base}'s response (events.py: the sampled "
                  "tokens under its tokenizer, the text under another)", off)
    problems.rule(BASE_TEXT_LOGPROBS, f"{base}'s text events value the split it sampled otherwise than its "
                  f"token-sequence record does (more than {tol:g} nats per token)", unequal)
    return {"n": n, "n_off": len(off), "text_events": text_event_figures(texts, sorted(cross))}


def text_event_figures(texts: list[TeacherForced], models: list[str]) -> dict:
    """How many spellings the text events summed, what they added to the best one, and the bound
    on what they left out."""
    gain = np.array([t.logprob - t.path_logprobs[0] for t in texts], dtype=float)
    bound = np.array([t.dropped_bound for t in texts], dtype=float)
    paths = [len(t.paths) for t in texts]
    return {"n": len(texts), "tokenizers_differ": models,
            "mean_paths": float(np.mean(paths)) if paths else None, "max_paths": max(paths, default=None),
            "gain_over_best_path": value_spread(gain.tolist()),
            "n_gain_over_0.1_nat": int((gain > 0.1).sum()),
            "dropped_bound": value_spread(bound.tolist())}


def check_exported_weights(config: Config, data: Dataset, problems: Problems) -> dict:
    """The CJE logged data as export.py writes it: each target minus base, against the weight
    taken from the records themselves (the target's event over the base's record of that event)."""
    from .export import logged_records
    base, off = config.base_policy, []
    try:
        records = logged_records(config, data)
    except (KeyError, TypeError, AttributeError):
        return {"n_off": None}        # a missing or malformed record: reported by its own rule
    for rec in records:
        pid = rec["prompt_id"]
        for t, lp in rec["target_policy_logprobs"].items():
            tr = data.logprobs[(pid, t)]
            den = data.base_text[(pid, base)] if tr.event == "text" else data.logprobs[(pid, base)]
            want = tr.logprob - den.logprob
            if not abs((lp - rec["base_policy_logprob"]) - want) <= 1e-9 * max(1.0, abs(want)):
                off.append(f"{pid}/{t}: {lp - rec['base_policy_logprob']:.6g} exported, {want:.6g} its weight")
    problems.rule("cje/logged_data.jsonl", "exported log-weights (target minus base) are not the targets' own", off)
    return {"n_off": len(off)}


def check_tf_vs_sampling(config: Config, data: Dataset, problems: Problems) -> dict:
    """The base policy's response, teacher-forced under itself, token by token against the sampler."""
    base = config.base_policy
    tol = config.tf_tolerance(base)
    diffs, over, mismatch = [], [], []
    for pid in _prompt_ids(data):
        r, t = data.responses.get((pid, base)), data.logprobs.get((pid, base))
        if r is None or t is None or not shape_ok(r, "sampling_logprob") or not shape_ok(t, "logprob"):
            continue
        if t.token_ids != r.token_ids:
            mismatch.append(pid)      # listed by the scored-event rule
            continue
        d = worst_token(t.token_logprobs, r.token_logprobs)
        diffs.append(d)
        if d > tol:
            over.append((d, f"{_where(data, LOGPROBS, pid, base)}: a token {d:.3g} nats off"))
    over.sort(key=lambda t: -t[0])
    problems.rule(LOGPROBS, f"{base} records have a token whose teacher-forced log-probability differs "
                  f"from its sampling log-probability by more than {tol:g} nats (largest first)",
                  [s for _, s in over])
    return {
        "policy": base, "tolerance_per_token": tol, **value_spread(diffs), "n_over": len(over),
        "token_count_mismatches": len(mismatch),
    }


def check_self_consistency(config: Config, data: Dataset, problems: Problems) -> dict:
    """Every policy's own responses under itself, computed in a pass of its own by stage 2b."""
    consistency, over, mismatch = {}, [], []
    for pol in config.policies:
        ds, tol = [], config.tf_tolerance(pol.name)
        for (pid, name), sc in data.self_checks.items():
            r = data.responses.get((pid, name))
            if name != pol.name or r is None or not shape_ok(r, "sampling_logprob"):
                continue
            if not isinstance(sc.token_logprobs, list) or len(sc.token_logprobs) != r.n_tokens:
                mismatch.append(f"{_where(data, SELF_CONSISTENCY, pid, name)}: "
                                f"{len(sc.token_logprobs) if isinstance(sc.token_logprobs, list) else '?'} "
                                f"values for {r.n_tokens} tokens")
                continue
            d = worst_token(sc.token_logprobs, r.token_logprobs)
            ds.append(d)
            if d > tol:
                over.append((d, f"{_where(data, SELF_CONSISTENCY, pid, name)}: a token {d:.3g} nats off "
                                f"(tolerance {tol:g})"))
        consistency[pol.name] = value_spread(ds)
    over.sort(key=lambda t: -t[0])
    problems.rule(SELF_CONSISTENCY, "records do not have one value per token of their response", mismatch)
    problems.rule(SELF_CONSISTENCY, "responses have a token whose teacher-forced log-probability "
                  "differs from its sampling log-probability by more than the tolerance (largest first)",
                  [s for _, s in over])
    return consistency


def check_suspicious(config: Config, data: Dataset, problems: Problems) -> dict:
    """An exact 0.0 on a non-empty response is a bug, not a certainty; very low values are listed."""
    threshold = config.validation.suspicious_per_token_logprob
    low = []
    for name, recs, attr in ((RESPONSES, data.responses, "sampling_logprob"),
                             (LOGPROBS, data.logprobs, "logprob")):
        zero = []
        for (pid, pol), r in recs.items():
            lp, n = getattr(r, attr), r.n_tokens
            if not lp_ok(lp) or not isinstance(n, int) or n <= 0:
                continue
            if lp == 0.0:
                zero.append(_where(data, name, pid, pol))
            elif lp / n < threshold:
                low.append({"file": name, "line": data.lines.get((name, pid, pol)), "prompt_id": pid,
                            "policy": pol, "logprob": lp, "n_tokens": n, "per_token": lp / n})
        problems.rule(name, "records have a log-probability of exactly 0.0 on a non-empty response", zero)
    low.sort(key=lambda it: it["per_token"])
    return {"low_per_token_logprob": {"threshold": threshold, "count": len(low), "examples": low[:MAX_LISTED]}}


PROPENSITY_CHECKS: list[tuple[str, Callable[[Config, Dataset, Problems], object]]] = [
    ("clone", check_clone),
    ("scored_events", check_scored_events),
    ("exported_weights", check_exported_weights),
    ("tf_vs_sampling", check_tf_vs_sampling),
    ("self_consistency", check_self_consistency),
    ("suspicious", check_suspicious),
]


def propensity_checks(config: Config, data: Dataset, problems: Problems) -> dict:
    """Every rule of PROPENSITY_CHECKS, in order: their figures by name."""
    return {name: check(config, data, problems) for name, check in PROPENSITY_CHECKS}
