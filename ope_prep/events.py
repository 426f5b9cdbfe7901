"""The event every policy scores of a base response: a weight's numerator and denominator must be
probabilities of the same event. Stage 2b scores it; stage 5 checks each record against it.

* A policy whose model has the base model's tokenizer scores the base's sampled token ids, whole
  (and the stop, when the response ended by itself): the exact event, whatever other targets need.
* A policy with another tokenizer scores the response's TEXT (`TextEvent`): "the response is this
  text, and ends" when it stopped by itself, else "the response begins with these bytes" (cut at
  max_tokens: a last token that crosses the cut counts). The base policy scores that same text
  event as well, for these targets' weights. A text's probability is the sum over every token
  sequence that spells it (text_probability.py), not one tokenization's: a model can give its
  canonical tokenization 15-20 nats less than the split it sampled.
  The text ends before the first control token the base sampled (<|im_start|> has no text under
  another tokenizer); bytes that are not UTF-8 are spelled by byte tokens.

The stop. A model stops on any of its end-of-generation tokens (Gemma 3: <end_of_turn> and <eos>),
so "it ended here" is the event that any of them comes next, with the log-sum-exp of their
log-probabilities (sampling.stop_logprob), under every policy and the base alike; the sampler
records that same value for the stop it drew.

An event with nothing to score (a response whose text is empty and did not end there) is an error
(`NoSharedEvent`), never a weight of 1.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .backends.llama import ChatTokenizer
from .records import Response


class NoSharedEvent(ValueError):
    """The response has no event to score: its weights cannot be computed."""


@dataclass
class TextEvent:
    text: bytes            # the bytes every policy with another tokenizer scores
    stops: bool            # the text, then the stop; else: the response begins with `text`
    sampled: list[int]     # the base's sampled tokens of `text` (no stop): one of its spellings
    whole: bool            # `text` is all of the response's text (no control token cut it short)


def text_event(resp: Response, base: ChatTokenizer) -> TextEvent:
    """The text event of the base response `resp` (see the module docstring)."""
    stopped = resp.finish_reason == "stop"
    text_ids = list(resp.token_ids[:-1] if stopped else resp.token_ids)
    cut = next((i for i, t in enumerate(text_ids) if not base.is_text_token(t)), len(text_ids))
    whole = cut == len(text_ids)
    ev = TextEvent(base.token_bytes(text_ids[:cut]), stopped and whole, text_ids[:cut], whole)
    if not ev.text and not ev.stops:
        raise NoSharedEvent("the response has no text before its first control token and did not end "
                            "there: no event to score (its weights cannot be computed)")
    return ev


def tokens_event(resp: Response, base: ChatTokenizer) -> tuple[list[int], int]:
    """What a policy with the base's tokenizer scores: the sampled ids, the stop included, and
    the bytes of their text."""
    text_ids = resp.token_ids[:-1] if resp.finish_reason == "stop" else resp.token_ids
    return list(resp.token_ids), len(base.token_bytes(text_ids))


def cross_tokenizer_models(base_model: str, vocab: dict[str, str]) -> set[str]:
    """The model keys whose tokenizer is not the base model's (vocab: key -> vocab_digest)."""
    return {k for k, v in vocab.items() if v != vocab[base_model]}


class Lattice:
    """A tokenizer's text tokens by their bytes: which tokens continue a text at a byte offset,
    which cross its end, and a spelling of any bytes."""

    def __init__(self, tok: ChatTokenizer):
        self.tok = tok
        by_piece: dict[bytes, list[int]] = {}
        for t in range(tok.n_vocab):
            if tok.is_text_token(t):
                piece = tok.piece_bytes(t)
                if piece:
                    by_piece.setdefault(piece, []).append(t)
        self.by_piece = by_piece
        self.pieces = sorted(by_piece)
        self.max_len = max(map(len, self.pieces))

    def length(self, token: int) -> int:
        return len(self.tok.piece_bytes(token))

    def inside(self, text: bytes, o: int) -> list[int]:
        """Tokens whose bytes are text[o:o + len], within the text."""
        out: list[int] = []
        for n in range(1, min(self.max_len, len(text) - o) + 1):
            out += self.by_piece.get(text[o:o + n], ())
        return out

    def crossing(self, text: bytes, o: int) -> list[int]:
        """Tokens whose bytes begin with text[o:] and go on past its end."""
        rest = text[o:]
        if len(rest) >= self.max_len:
            return []
        out: list[int] = []
        i = bisect.bisect_right(self.pieces, rest)    # rest itself (a token within the text) is not one
        while i < len(self.pieces) and self.pieces[i].startswith(rest):
            out += self.by_piece[self.pieces[i]]
            i += 1
        return out

    def spell(self, raw: bytes) -> list[int]:
        """Tokens spelling the longest prefix of raw they can: the tokenizer's own tokens for the
        UTF-8 runs, byte tokens for bytes that are not (no byte token: the spelling ends there)."""
        out: list[int] = []
        o = 0
        while o < len(raw):
            try:
                raw[o:].decode("utf-8")
                end = len(raw)
            except UnicodeDecodeError as e:
                end = o + e.start
            if end > o:
                toks = self.tok.tokenize_text(raw[o:end].decode("utf-8"))
                if self.tok.token_bytes(toks) != raw[o:end]:
                    return out
                out += toks
                o = end
            if o < len(raw):
                byte = self.by_piece.get(raw[o:o + 1])
                if not byte:
                    return out
                out.append(byte[0])
                o += 1
        return out

    def offsets(self, tokens: list[int]) -> list[int]:
        """Byte offsets of the token boundaries: 0, end of the first token, ..."""
        out = [0]
        for t in tokens:
            out.append(out[-1] + self.length(t))
        return out


def spells(lattice: Lattice, tokens: list[int], text: bytes) -> Optional[int]:
    """The length of text that tokens spell exactly (None: they do not spell a prefix of it)."""
    raw = lattice.tok.token_bytes(tokens)
    return len(raw) if text.startswith(raw) and all(lattice.tok.is_text_token(t) for t in tokens) else None


def lse(values) -> float:
    """log sum exp, -inf for none."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(np.logaddexp.reduce(v)) if len(v) else float("-inf")
