"""What every inference engine module answers: one request/read pair for sampling, one for
teacher forcing, and what the engine can and cannot do (checked by the config and the engine check).

An engine module knows its wire format only. What the values mean (the stop event, the checks,
temperatures, in-process teacher forcing) is decided once, in backends/remote.py, for all engines.
"""

from __future__ import annotations

import hashlib
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
    # Where the engine says what it serves (GET, under base_url), and the fields of that reply that
    # name the model, its weights and the engine's build: the engine check's fingerprint of a replica
    # (backends/engine_canary.py). The default is the OpenAI model list (vLLM, llama-cpp-python).
    identity_route: ClassVar[str] = "models"
    identity_fields: ClassVar[tuple[str, ...]] = ("id", "root", "parent", "max_model_len", "owned_by")

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

    def read_identity(self, raw: object) -> dict[str, str]:
        """The fingerprint in the engine's reply to GET identity_route. The default reads the
        served model's entry in the OpenAI model list; a native route's engine reads the reply
        itself (`fields`)."""
        listed = [m for m in (raw.get("data") if isinstance(raw, dict) else None) or [] if isinstance(m, dict)]
        entry = next((m for m in listed if m.get("id") == self.served_model), None)
        if entry is None and len(listed) == 1:
            entry = listed[0]      # a server of one model may list it by its path (llama-cpp-python without an alias)
        if entry is None:
            raise RequestFailed(f"GET {self.identity_route}: the engine does not list the model "
                                f"{self.served_model!r}", deterministic=True)
        return self.fields(entry)

    def fields(self, raw: object) -> dict[str, str]:
        """Each of identity_fields the reply gives, as text (a long text by its digest). Fields that
        change by themselves (a listing's ``created`` time, slots in use) are never among them."""
        if not isinstance(raw, dict):
            raise RequestFailed(f"GET {self.identity_route}: the reply is not a JSON object", deterministic=True)
        return {k: _shown(raw[k]) for k in self.identity_fields if raw.get(k) is not None}

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


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= 200:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]   # a chat template
