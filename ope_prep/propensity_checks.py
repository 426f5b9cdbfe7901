"""Stage 5's propensity rules: each a `check_<rule>(config, data, problems)` that adds its fatal
problems and returns its figures for dataset_info.json's "checks"; `PROPENSITY_CHECKS` runs
them in order. A new rule is one function and one entry in that list.

* clone: pi_clone's log-weight (teacher-forced under pi_clone minus under the base policy, each
  from a pass of its own in stage 2b) within ``validation.clone_tolerance`` of 0;
* scored_events: every teacher-forced record scores the very event its base response defines
  (ope_prep/events.py): the same token ids under a model with the base's tokenizer, the same
  bytes under another, the same `scored_bytes`, `complete`, and stop. Stage 2b wrote them from
  that same definition, so a record that departs from it (cut short, a flag flipped, another
  tokenizer's spelling, nothing scored) was damaged or made by other code, and its weight is
  wrong. The event is recomputed from the base response and each model's tokenizer
  (vocabulary only, no weights);
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
from .events import NoSharedEvent, scored_event
from .files import LOGPROBS, RESPONSES, SELF_CONSISTENCY
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


def event_mismatch(t: TeacherForced, want_tokens: list[int], want_bytes: int, want_complete: bool) -> str | None:
    """How record t departs from the event it must score (None: it does not)."""
    how = []
    if t.token_ids != want_tokens:
        if t.token_ids == want_tokens[:len(t.token_ids)]:
            how.append(f"{len(t.token_ids)} tokens scored, the event has {len(want_tokens)}")
        else:
            how.append(f"other token ids than the event's {len(want_tokens)}")
    if t.scored_bytes != want_bytes:
        how.append(f"scored_bytes {t.scored_bytes}, the event's {want_bytes}")
    if t.complete != want_complete:
        how.append(f"complete {t.complete}, the event's {want_complete}")
    return ", ".join(how) or None


def check_scored_events(config: Config, data: Dataset, problems: Problems) -> dict:
    """For each prompt, the base response's event against every policy's record."""
    base = config.base_policy
    base_model = config.policy(base).model
    tokenizers, vocab = policy_tokenizers(config)
    stop_tokens = set(tokenizers[base_model].end_of_generation_tokens())
    n, off, no_event, bad_stop = 0, [], [], []
    for pid in _prompt_ids(data):
        r = data.responses.get((pid, base))
        if r is None or not shape_ok(r, "sampling_logprob"):
            continue      # reported by the responses' own rules
        if r.finish_reason == "stop" and (not r.token_ids or r.token_ids[-1] not in stop_tokens):
            bad_stop.append(f"{_where(data, RESPONSES, pid, base)}: finish_reason stop, but its last token "
                            f"{r.token_ids[-1] if r.token_ids else None} is no end-of-generation token")
            continue
        try:
            ev = scored_event(r, base_model, tokenizers, vocab)
        except NoSharedEvent as e:
            if any((pid, p.name) in data.logprobs for p in config.policies):
                no_event.append(f"{_where(data, RESPONSES, pid, base)}: {e}")
            continue
        for pol in config.policies:
            t = data.logprobs.get((pid, pol.name))
            if t is None or not shape_ok(t, "logprob"):
                continue
            n += 1
            how = event_mismatch(t, ev.tokens[pol.model], ev.scored_bytes, ev.complete)
            if how:
                off.append(f"{_where(data, LOGPROBS, pid, pol.name)}: {how}")
    problems.rule(RESPONSES, f"{base} responses say they stopped but do not end in a stop token", bad_stop)
    problems.rule(LOGPROBS, "prompts have records although their base response has no event every "
                  "tokenizer shares (stage 2b quarantines those)", no_event)
    problems.rule(LOGPROBS, f"records do not score the event of {base}'s response (the same tokens, "
                  "scored_bytes and complete as stage 2b's definition)", off)
    return {"n": n, "n_off": len(off)}


def check_tf_vs_sampling(config: Config, data: Dataset, problems: Problems) -> dict:
    """The base policy's response, teacher-forced under itself, token by token against the sampler."""
    base = config.base_policy
    tol = config.tf_tolerance(base)
    diffs, over, mismatch, partial, fractions = [], [], [], 0, []
    for pid in _prompt_ids(data):
        r, t = data.responses.get((pid, base)), data.logprobs.get((pid, base))
        if r is None or t is None or not shape_ok(r, "sampling_logprob") or not shape_ok(t, "logprob"):
            continue
        if t.token_ids != r.token_ids[:t.n_tokens] or (t.complete and t.n_tokens != r.n_tokens):
            mismatch.append(pid)      # listed by the scored-event rule
            continue
        partial += not t.complete
        if isinstance(r.response, str):   # a malformed one is reported by its own rule
            text_bytes = len(r.text_bytes_hex) // 2 if isinstance(r.text_bytes_hex, str) else len(r.response.encode())
            fractions.append(t.scored_bytes / text_bytes if text_bytes else 1.0)
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
        # Scored prefixes (another tokenizer, and a response that was cut or is not plain text)
        "n_partial": partial, "mean_scored_fraction": float(np.mean(fractions)) if fractions else None,
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
    ("tf_vs_sampling", check_tf_vs_sampling),
    ("self_consistency", check_self_consistency),
    ("suspicious", check_suspicious),
]


def propensity_checks(config: Config, data: Dataset, problems: Problems) -> dict:
    """Every rule of PROPENSITY_CHECKS, in order: their figures by name."""
    return {name: check(config, data, problems) for name, check in PROPENSITY_CHECKS}
