"""The event every policy scores of a base response: a weight's numerator and denominator must be
probabilities of the same event. Stage 2b scores it; stage 5 recomputes it and checks each record.

Under a model with the base model's tokenizer the stored token ids are scored as sampled. When
some policy's tokenizer differs:

* a response that stopped by itself, whose text every tokenizer spells exactly: the whole text,
  then the stop ("the response is this text, and ends");
* otherwise (cut at max_tokens, a control token sampled mid-response, bytes that are not
  UTF-8): "the response starts with these bytes", for the longest prefix that ends strictly
  before the first unrepresentable byte (or before the end of a cut response: the cut may fall
  inside another tokenizer's token, "photos" | "ynthesis") at a position where every tokenizer's
  tokens of the text have a boundary, and where each model's tokens of the prefix are what its
  tokenizer makes of the prefix text alone (so an engine that takes text scores them). Every
  policy, the base included, scores that prefix, so one base log-probability serves every target.

The stop. A model stops on any of its end-of-generation tokens (Gemma 3: <end_of_turn> and <eos>),
so "it ended here" is the event that any of them comes next, with the log-sum-exp of their
log-probabilities (sampling.stop_logprob), under every policy and the base alike; the sampler
records that same value for the stop it drew. In `tokens`, a stop is the last id: the sampled
end token under the base's tokenizer, the template's end-of-turn token under another (a marker:
the value is the whole set's).

An event with no token to score (no boundary every tokenizer shares, as when a tokenizer adds a
leading space to the text) is an error (`NoSharedEvent`), never a weight of 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backends.llama import ChatTokenizer
from .records import Response


class NoSharedEvent(ValueError):
    """The policies' tokenizers share no event of this response: its weights cannot be computed."""


@dataclass
class ScoredEvent:
    tokens: dict[str, list[int]]   # model key -> the tokens that model scores
    scored_bytes: int
    complete: bool
    stops: bool                    # the event ends in the stop (each model's last token is its marker)


def _offsets(tok: ChatTokenizer, tokens: list[int]) -> list[int]:
    """Byte offsets of the token boundaries: 0, end of the first token, ..."""
    out = [0]
    for t in tokens:
        out.append(out[-1] + len(tok.piece_bytes(t)))
    return out


def _utf8_prefix(raw: bytes) -> int:
    """Length of the longest prefix of raw that is valid UTF-8."""
    try:
        raw.decode("utf-8")
        return len(raw)
    except UnicodeDecodeError as e:
        return e.start


def _common_length(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def scored_event(resp: Response, base_model: str, tokenizers: dict[str, ChatTokenizer],
                 vocab: dict[str, str]) -> ScoredEvent:
    """What every policy scores of the base response `resp` (see the module docstring).
    tokenizers: model key -> its tokenizer; vocab: model key -> its vocab_digest.
    Raises NoSharedEvent when there is nothing to score."""
    stopped = resp.finish_reason == "stop"
    same = [k for k in tokenizers if vocab[k] == vocab[base_model]]
    others = [k for k in tokenizers if vocab[k] != vocab[base_model]]
    base = tokenizers[base_model]
    text_ids = list(resp.token_ids[:-1] if stopped else resp.token_ids)
    raw = base.token_bytes(text_ids)
    if not others:
        return _nonempty(ScoredEvent({k: list(resp.token_ids) for k in same}, len(raw), True, stopped), raw)

    base_offsets = _offsets(base, text_ids)
    # Representable: up to the first control token, and valid UTF-8.
    limit = len(raw)
    for i, t in enumerate(text_ids):
        if not base.is_text_token(t):
            limit = base_offsets[i]
            break
    limit = _utf8_prefix(raw[:limit])
    text = raw[:limit].decode("utf-8")
    common = {o for o in base_offsets if o <= limit}
    other_tokens: dict[str, tuple[list[int], list[int]]] = {}
    by_vocab: dict[str, tuple[list[int], list[int]]] = {}
    for k in others:
        if vocab[k] not in by_vocab:
            toks = tokenizers[k].tokenize_text(text)
            offs = _offsets(tokenizers[k], toks)
            agree = _common_length(tokenizers[k].token_bytes(toks), raw[:limit])
            common &= {o for o in offs if o <= agree}
            limit = min(limit, agree)    # past `agree` this tokenizer does not spell the text
            by_vocab[vocab[k]] = (toks, offs)
        other_tokens[k] = by_vocab[vocab[k]]
    if stopped and limit == len(raw):
        tokens = {k: list(resp.token_ids) for k in same}
        tokens.update({k: toks + [tokenizers[k].end_of_turn] for k, (toks, _) in other_tokens.items()})
        return ScoredEvent(tokens, len(raw), True, True)
    for cut in sorted((o for o in common if 0 < o < limit), reverse=True):
        tokens = {k: text_ids[:base_offsets.index(cut)] for k in same}
        tokens.update({k: toks[:offs.index(cut)] for k, (toks, offs) in other_tokens.items()})
        if _spelled_alone(raw[:cut], tokens, tokenizers):
            return ScoredEvent(tokens, cut, False, False)
    return _nonempty(ScoredEvent({k: [] for k in tokenizers}, 0, False, False), raw)


def _nonempty(ev: ScoredEvent, raw: bytes) -> ScoredEvent:
    if any(ev.tokens.values()):
        return ev
    raise NoSharedEvent(f"no part of the response ({len(raw)} bytes) is one event under every policy's "
                        "tokenizer (no shared token boundary): its weights cannot be computed")


def _spelled_alone(prefix: bytes, tokens: dict[str, list[int]], tokenizers: dict[str, ChatTokenizer]) -> bool:
    """Whether each model's tokens of the prefix are also what its tokenizer makes of the prefix
    text alone. A cut after "code:\n" of "code:\n\n```" is not ("\n\n" at the end of a text is one
    token): an engine that takes text prompts (llama_cpp) would then score other tokens."""
    try:
        text = prefix.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(tokenizers[k].tokenize_text(text) == toks for k, toks in tokens.items())
