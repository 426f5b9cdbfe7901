"""Typed records that go in and out of each stage (one JSON object per line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .store import input_digest


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
    """The base policy's response scored under one policy (ope_prep/events.py).

    event "tokens" (a policy whose model has the base's tokenizer): the sampled token ids, whole,
    and their stop; `logprob` is the sum of `token_logprobs`.
    event "text" (another tokenizer, and the base policy's own record of the same event in
    base_text_logprobs.jsonl): the text's probability, the log-sum-exp over the token sequences
    found to spell it (`paths`, each with its value in `path_logprobs`) and, for a response that
    begins with the text (cut, not stopped), over the sequences whose last token crosses its end
    after an inner node (`crossing_logprob`); `token_ids`/`token_logprobs` are the best path's
    (with the end-of-turn marker and the stop's value when the event stops)."""
    prompt_id: str
    policy: str               # the policy under which the base policy's response is scored
    logprob: float            # log-probability of the event
    n_tokens: int             # len(token_ids)
    token_ids: list[int]      # the scored tokens under this policy's tokenizer (text: the best path's)
    token_logprobs: list[float]
    scored_bytes: int         # bytes of the response text scored
    complete: bool            # the event is the whole response (with its stop if it stopped)
    event: str = "tokens"     # "tokens" or "text"
    paths: Optional[list[list[int]]] = None
    path_logprobs: Optional[list[float]] = None
    crossing_logprob: Optional[float] = None
    dropped_bound: Optional[float] = None   # a bound on the share of the event's mass the search left out


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
    # scored_digest(prompt, response) of the exact texts scored: stage 5 checks it against the
    # current response, so a score of an earlier response is never paired with a new one. None
    # only in a file written before scores carried it (stage 5 refuses it: rerun the stage).
    input_digest: Optional[str] = None
    # The model that answered, as its reply names it (an API alias's dated snapshot; in process,
    # the GGUF file); None if the reply named none. Stage 5 reports a run scored by more than one.
    model: Optional[str] = None


@dataclass
class OracleLabel:
    prompt_id: str
    policy: str
    split: str                # "calibration" (p0) or "validation" (targets)
    label: float              # [0, 1]
    raw: str
    input_digest: Optional[str] = None    # as JudgeScore.input_digest
    model: Optional[str] = None           # as JudgeScore.model


def scored_digest(prompt: str, response: str) -> str:
    """What a judge score or an oracle label was computed from: the prompt and the response
    under judgment (the scoring unit's input digest and the record's ``input_digest``)."""
    return input_digest("scored", prompt, response)


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
