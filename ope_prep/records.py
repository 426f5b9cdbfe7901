"""Typed records that go in and out of each stage (one JSON object per line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Prompt:
    prompt_id: str
    prompt: str
    source: str          # the source's name in source.mix (e.g. "sharegpt")
    source_row: int      # row index in the source
    source_id: str       # the source's own conversation id (or "row<n>")
    source_revision: str  # the hub revision, or a digest of the source's files
    text_digest: str     # sha256 of the prompt text


@dataclass
class Response:
    prompt_id: str
    policy: str
    response: str             # exactly the bytes of the sampled tokens (see text_bytes_hex)
    token_ids: list[int]
    # log softmax(logits / T) of each token, as the sampler drew it; a stop's value is the stop
    # event's: any end-of-generation token next (ope_prep/events.py)
    token_logprobs: list[float]
    sampling_logprob: float   # their sum (the stop's included when it stopped)
    n_tokens: int             # len(token_ids)
    finish_reason: str        # "stop" (an end-of-generation token was sampled: the last id) or "length"
    seed: int
    # Set only when the tokens' bytes are not valid UTF-8 (a character cut at max_tokens, stray
    # byte tokens): the exact bytes in hex; `response` then shows U+FFFD where they do not decode.
    text_bytes_hex: Optional[str] = None


@dataclass
class TeacherForced:
    """The base policy's response scored under one policy. Every policy scores the same event:
    the whole response (and its stop, when it stopped by itself: any end-of-generation token
    next), or, when the policies' tokenizers differ and the whole response is not the same event
    for all of them (a cut at max_tokens, a control token, bytes that are not UTF-8), its first
    `scored_bytes` bytes, up to a token boundary that every tokenizer shares (ope_prep/events.py)."""
    prompt_id: str
    policy: str               # the policy under which the base policy's response is scored
    logprob: float            # sum of token_logprobs
    n_tokens: int             # len(token_ids)
    token_ids: list[int]      # the scored response under this policy's tokenizer
    token_logprobs: list[float]
    scored_bytes: int         # bytes of the response text scored
    complete: bool            # the whole response was scored (with its end of turn if it stopped)


@dataclass
class SelfCheck:
    """A policy's own response teacher-forced under itself, in a pass of its own: each value
    must equal the sampler's log-probability for that token (stage 5 checks it)."""
    prompt_id: str
    policy: str
    token_logprobs: list[float]


@dataclass
class JudgeScore:
    prompt_id: str
    policy: str
    score: float              # deterministic (temperature 0) score on [0, 1]
    mean: float               # mean of the judge's distribution over score tokens, [0, 1]
    variance: float
    raw: str                  # the judge's text


@dataclass
class OracleLabel:
    prompt_id: str
    policy: str
    split: str                # "calibration" (p0) or "validation" (targets)
    label: float              # [0, 1]
    raw: str


@dataclass
class Quarantined:
    """A unit that failed deterministically (see store.WorkFile): its prompt is left out of the
    dataset for every policy, and stage 5 lists it."""
    stage: str
    key: str
    prompt_id: str
    error: str
    tries: int


@dataclass
class UsageTotals:
    calls: int = 0
    cached: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    failures: int = 0
    notes: Optional[str] = None
    seconds: float = 0.0        # wall seconds of the work, model loading left out (stage 2b)
