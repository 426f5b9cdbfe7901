"""Typed records that go in and out of each stage (one JSON object per line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Prompt:
    prompt_id: str
    prompt: str
    source: str          # e.g. "sharegpt" or the hub dataset name
    source_row: int      # row index in the source
    source_id: str       # the source's own conversation id


@dataclass
class Response:
    prompt_id: str
    policy: str
    response: str
    token_ids: list[int]
    sampling_logprob: float   # sum of log softmax(logits / T) over token_ids (+ end-of-turn if stopped)
    n_tokens: int             # len(token_ids)
    finish_reason: str        # "stop" (end-of-turn was sampled, and is in the logprob) or "length"
    seed: int


@dataclass
class TeacherForced:
    prompt_id: str
    policy: str               # the policy under which the base policy's response is scored
    logprob: float
    n_tokens: int             # tokens scored, end-of-turn included when the response stopped by itself
    token_ids: list[int] = field(default_factory=list)   # the response under this policy's tokenizer


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
class UsageTotals:
    calls: int = 0
    cached: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    failures: int = 0
    notes: Optional[str] = None
