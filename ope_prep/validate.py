"""Stage-5 checks that need more than the records themselves (today: the tokenizers).

Every teacher-forced record must score the very event its base response defines (ope_prep/events.py):
the same token ids under a model with the base's tokenizer, the same bytes under another, the same
`scored_bytes`, `complete`, and stop. Stage 2b wrote them from that same definition, so any record
that departs from it (cut short, a flag flipped, another tokenizer's spelling, nothing scored) was
damaged or made by other code, and its weight is wrong. The event is recomputed here from the
base response and each model's tokenizer (vocabulary only, no weights).
"""

from __future__ import annotations

from typing import Callable

from .backends.providers import policy_tokenizers
from .config import Config
from .events import NoSharedEvent, scored_event
from .files import LOGPROBS, RESPONSES
from .records import Response, TeacherForced


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


def check_scored_events(config: Config, pids: list[str], responses: dict[tuple[str, str], Response],
                        logprobs: dict[tuple[str, str], TeacherForced], shape_ok: Callable,
                        where: Callable[[str, str, str], str]) -> dict:
    """For each prompt, the base response's event against every policy's record. Returns
    {"n": records compared, "off": ["<where>: <how>"], "no_event": [...], "bad_stop": [...]}."""
    base = config.base_policy
    base_model = config.policy(base).model
    tokenizers, vocab = policy_tokenizers(config)
    stop_tokens = set(tokenizers[base_model].end_of_generation_tokens())
    out: dict = {"n": 0, "off": [], "no_event": [], "bad_stop": []}
    for pid in pids:
        r = responses.get((pid, base))
        if r is None or not shape_ok(r, "sampling_logprob"):
            continue      # reported by the responses' own rules
        if r.finish_reason == "stop" and (not r.token_ids or r.token_ids[-1] not in stop_tokens):
            out["bad_stop"].append(f"{where(RESPONSES, pid, base)}: finish_reason stop, but its last token "
                                   f"{r.token_ids[-1] if r.token_ids else None} is no end-of-generation token")
            continue
        try:
            ev = scored_event(r, base_model, tokenizers, vocab)
        except NoSharedEvent as e:
            if any((pid, p.name) in logprobs for p in config.policies):
                out["no_event"].append(f"{where(RESPONSES, pid, base)}: {e}")
            continue
        for pol in config.policies:
            t = logprobs.get((pid, pol.name))
            if t is None or not shape_ok(t, "logprob"):
                continue
            out["n"] += 1
            how = event_mismatch(t, ev.tokens[pol.model], ev.scored_bytes, ev.complete)
            if how:
                out["off"].append(f"{where(LOGPROBS, pid, pol.name)}: {how}")
    return out
