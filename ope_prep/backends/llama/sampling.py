"""Temperature-only sampling and log-probabilities from raw logits, with one arithmetic.

The sampler and teacher forcing compute a token's log-probability the same way: exp of
(x - max) / T in float32, summed in float64, the token's own term in float64. With equal
logits the two agree to ~1e-12 nats; stage 5 checks that they do.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Sampling finds the drawn token block by block: block sums, then one block's running sum.
_BLOCK = 1024

# Rows per numpy pass when scoring logits, so temporaries stay small (Gemma 3: 16 MB).
_ROWS_PER_PASS = 16


def log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _normalizers(r: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of float32 logits r (n, V): its max and log of the sum of exp((x - max) / T), the
    sum of exponentials in float32 terms summed in float64 (as the sampler computes it)."""
    m = r.max(axis=1, keepdims=True)
    e = r - m
    e /= np.float32(temperature)
    np.exp(e, out=e)
    return m[:, 0].astype(np.float64), np.log(e.sum(axis=1, dtype=np.float64))


def token_logprobs(rows: np.ndarray, targets: Sequence[int], temperature: float) -> np.ndarray:
    """log softmax(rows / T)[i, targets[i]] for float32 logits rows (n, V), as float64.

    The sum of exponentials runs in float32 over (x - max) / T (relative error ~1e-7, so
    ~1e-7 nats), the target's own term in float64. Sampling uses the same arithmetic.
    """
    rows = np.asarray(rows)
    targets = np.asarray(targets, dtype=np.intp)
    out = np.empty(len(targets), dtype=np.float64)
    for a in range(0, len(targets), _ROWS_PER_PASS):
        r = rows[a:a + _ROWS_PER_PASS]
        m, log_s = _normalizers(r, temperature)
        x = r[np.arange(len(r)), targets[a:a + _ROWS_PER_PASS]].astype(np.float64)
        out[a:a + len(r)] = (x - m) / temperature - log_s
    return out


def candidate_logprobs(row: np.ndarray, candidates: Sequence[int], temperature: float) -> np.ndarray:
    """log softmax(row / T) at each of `candidates` (token ids) of one float32 logits row, each
    value exactly what token_logprobs gives that token: the text-event search reads every token
    that continues a text from one row."""
    row = np.asarray(row)
    m, log_s = _normalizers(row[None, :], temperature)
    x = row[np.asarray(candidates, dtype=np.intp)].astype(np.float64)
    return (x - m[0]) / temperature - log_s[0]


def stop_logprob(row: np.ndarray, stop_tokens: Sequence[int], temperature: float) -> float:
    """log of the probability, under softmax(row / T), that the next token is any of
    `stop_tokens` (a model's end-of-generation set): the event "the response ends here", one
    event whichever stop token a sampler would draw.

    A probability by construction: -log(1 + S_rest / S_stop), where S_stop is the stop tokens'
    mass (their exponents in float64, summed in the log domain) and S_rest every other token's
    (exp in float32, summed in float64, as token_logprobs does). Summing per-token terms, each
    taken against one float32 total, rounded above 0 when the stop tokens held nearly all the mass
    (issue 37, item 3); log(1 + x) >= 0 for x >= 0, so this cannot, and it keeps the tiny
    remainder a difference of two logs would round away. Sampling and teacher forcing both call
    this function on the same row: the same bits."""
    if not len(stop_tokens):
        raise ValueError("a stop event needs at least one stop token")
    row = np.asarray(row)
    stops = np.unique(np.asarray(stop_tokens, dtype=np.intp))
    m = row.max()
    e = row - m
    e /= np.float32(temperature)
    np.exp(e, out=e)
    e[stops] = 0.0
    rest = e.sum(dtype=np.float64)
    z = (row[stops].astype(np.float64) - float(m)) / temperature
    log_stop = float(np.logaddexp.reduce(z))
    log_rest = math.log(rest) if rest > 0 else -math.inf
    return -float(np.logaddexp(0.0, log_rest - log_stop))


class Sampler:
    """Draws from softmax(logits / T) and nothing else; one buffer, reused per draw."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        n_blocks = -(-n_vocab // _BLOCK)
        self._buf = np.zeros(n_blocks * _BLOCK, dtype=np.float32)   # the tail stays 0

    def sample(self, row: np.ndarray, temperature: float, u: float) -> tuple[int, float]:
        """Draw from softmax(row / T) with the uniform u; returns (token, its log-probability).

        Inverse CDF, searched per block of _BLOCK tokens (block sums, then one block's running
        sum), so the vocabulary is touched once by exp and a sum instead of a full cumsum.
        """
        buf = self._buf
        e = buf[:self.n_vocab]
        m = row.max()
        np.subtract(row, m, out=e)
        e /= np.float32(temperature)
        np.exp(e, out=e)
        block_sums = buf.reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
        cum = np.cumsum(block_sums)
        total = float(cum[-1])
        target = u * total
        b = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
        base = float(cum[b - 1]) if b else 0.0
        within = base + np.cumsum(buf[b * _BLOCK:(b + 1) * _BLOCK], dtype=np.float64)
        tok = b * _BLOCK + min(int(np.searchsorted(within, target, side="right")), _BLOCK - 1)
        while tok >= self.n_vocab or buf[tok] == 0.0:   # rounding at a block's end: step back to mass
            tok -= 1
        s = float(e.sum(dtype=np.float64))               # as token_logprobs computes it
        return tok, (float(row[tok]) - float(m)) / temperature - math.log(s)
