"""What every inference engine module answers: one request/read pair for sampling, one for
teacher forcing, and what the engine can and cannot do (checked by the config and the engine check).

An engine module knows its wire format only. What the values mean (the stop event, the checks,
temperatures, in-process teacher forcing) is decided once, in backends/remote.py, for all engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

from ..replies import Reply, Request, RequestFailed

if TYPE_CHECKING:
    from ..llama.chat import ChatTokenizer


@dataclass
class Sampled:
    """One sampled response as the engine returned it."""
    token_ids: list[int]          # the stop token included only where the engine returned it
    token_logprobs: list[float]   # each token's value as the engine sampled it
    finish_reason: str            # "stop" (ended by itself) or "length"
    listing: list[dict]           # per token {"logprob", "top": [[token, logprob], ...]}: the sampling test


class Engine:
    """One engine's wire format. Subclasses set the class attributes and the four methods."""

    name: ClassVar[str]
    # None: the OpenAI completions API under base_url (which ends in /v1); else the engine's own
    # route under base_url (the server's root).
    route: ClassVar[Optional[str]] = None
    # Why the engine cannot return the log-probabilities of given tokens ("" when it can): then
    # teacher forcing must run in process (endpoint.teacher_force false).
    no_teacher_forcing: ClassVar[str] = ""
    # Why the values it returns while sampling are not after temperature ("" when they are, or
    # can be: the engine check decides): then its policies need temperature 1.0.
    no_temperature: ClassVar[str] = ""
    # The most top log-probabilities per position the engine returns (the engine check asks up to it).
    max_top_logprobs: ClassVar[int] = 20
    # Engines return prompt log-probabilities from the raw logits (temperature 1): a policy at
    # another temperature is teacher-forced in process.

    def __init__(self, chat: "ChatTokenizer", served_model: str):
        self.chat, self.served_model = chat, served_model

    def generation_request(self, prompt: Sequence[int], temperature: float, seed: int, max_tokens: int,
                           top_logprobs: int) -> Request:
        raise NotImplementedError

    def read_generation(self, reply: Reply, prompt: Sequence[int]) -> Sampled:
        raise NotImplementedError

    def teacher_force_request(self, tokens: Sequence[int]) -> Request:
        """A request for the log-probability of each of ``tokens`` given the ones before it, at
        temperature 1 (only asked when no_teacher_forcing is "")."""
        raise NotImplementedError

    def read_teacher_force(self, reply: Reply, tokens: Sequence[int], n_response: int) -> list[float]:
        """The values of the last n_response of ``tokens``."""
        raise NotImplementedError

    # ---- shared by the engine modules ---------------------------------------------------------
    @staticmethod
    def check_prompt_count(counted: int, prompt: Sequence[int]) -> None:
        if counted and counted != len(prompt):
            raise RequestFailed(
                f"the engine read the prompt as {counted} tokens, not {len(prompt)}: it tokenized the text "
                "otherwise (a control token spelled in the prompt?)", certain=True)

    @staticmethod
    def values(entries: Sequence[Optional[float]], what: str) -> list[float]:
        if any(v is None for v in entries):
            raise RequestFailed(f"{what} has no log-probability", deterministic=True)
        return [float(v) for v in entries]

    @staticmethod
    def finish(reason: Optional[str], stop: Sequence[str], length: Sequence[str]) -> str:
        """The engine's finish reason as "stop" or "length"; anything else (a stop string, an abort)
        is not the model's own end."""
        if reason in stop:
            return "stop"
        if reason in length:
            return "length"
        raise RequestFailed(f"finish_reason {reason!r}", deterministic=True)
