"""Generation: up to n_seq sequences per llama_decode step, slots refilled as sequences end.

Each job's randomness comes only from its own seed (one uniform per token), and each token is
drawn from softmax(logits / T) with nothing else applied, so the recorded log-probability is
the true sampling probability, and the result does not depend on which other jobs ran alongside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np

from .engine import _GRAIN, _MIN_SHARED, Engine, PromptTooLong, _common_prefix
from .sampling import stop_logprob


@dataclass
class Generation:
    token_ids: list[int]      # sampled tokens, the end-of-generation token included if sampled
    # log softmax(logits / T) of each, as the sampler drew it; for the end-of-generation token,
    # the stop event's: any end-of-generation token next (sampling.stop_logprob)
    token_logprobs: list[float]
    finish_reason: str        # "stop" or "length"

    @property
    def logprob(self) -> float:
        return math.fsum(self.token_logprobs)


@dataclass
class _GenState:
    job: int
    prompt: list[int]
    temperature: float
    rng: np.random.Generator
    pos: int = 0                                   # next position to decode
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class Generator(Engine):
    def generate(self, jobs: list[tuple[list[int], float, int]], max_tokens: int) -> list[Generation]:
        """Sample one response per (prompt_tokens, temperature, seed); see generate_iter.
        A job that cannot run (too long for the context) is refused before any runs."""
        for job in jobs:
            self._check_job(job, max_tokens)
        results: list[Optional[Generation]] = [None] * len(jobs)
        for j, gen in self.generate_iter(jobs, max_tokens):
            results[j] = gen
        return results  # type: ignore[return-value]

    def _check_job(self, job: tuple[list[int], float, int], max_tokens: int) -> None:
        prompt, temp, _ = job
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + max_tokens > self.n_ctx_per_seq:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} "
                                f"exceeds the context of {self.n_ctx_per_seq}")
        if not temp > 0:
            raise ValueError(f"temperature must be positive (got {temp})")

    def generate_iter(self, jobs: Iterable[tuple[list[int], float, int]],
                      max_tokens: int) -> Iterator[tuple[int, Generation]]:
        """Yield (job index, Generation) as each job finishes, up to n_seq jobs decoding at
        once; a job is taken from `jobs` (which may be lazy) when a sequence slot frees up.

        Each job's randomness comes only from its own seed (one uniform per token), and each
        token is drawn from softmax(logits / T) with nothing else applied, so the recorded
        log-probability is the true sampling probability, and the result does not depend on
        which other jobs ran alongside.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        pending = enumerate(jobs)
        exhausted = False
        active: dict[int, _GenState] = {}     # sequence id -> state
        free = list(range(self.n_seq))
        self._clear()
        try:
            while not exhausted or active:
                while not exhausted and free:
                    nxt = next(pending, None)
                    if nxt is None:
                        exhausted = True
                        break
                    j, job = nxt
                    self._check_job(job, max_tokens)
                    seq = min(free)
                    free.remove(seq)
                    prompt, temp, seed = job
                    st = _GenState(j, list(prompt), float(temp), np.random.default_rng(seed))
                    done = self._advance(st, self._start(st, seq, active), max_tokens)
                    if done is None:
                        active[seq] = st
                    else:
                        self._clear(seq)
                        free.append(seq)
                        yield j, done
                if exhausted:
                    self._compact(active, free)
                if not active:
                    continue
                order = sorted(active)   # ascending ids: llama.cpp puts them in one ubatch
                finished = []
                for a in range(0, len(order), _GRAIN - 1):
                    step = order[a:a + _GRAIN - 1]
                    self._decode([(active[s].tokens[-1], active[s].pos, s, True) for s in step])
                    for i, s in enumerate(step):
                        st = active[s]
                        st.pos += 1
                        done = self._advance(st, self._row(i), max_tokens)
                        if done is not None:
                            finished.append((s, done))
                for s, done in finished:
                    job = active.pop(s).job
                    self._clear(s)
                    free.append(s)
                    yield job, done
        finally:
            self._clear()

    def _compact(self, active: dict[int, _GenState], free: list[int]) -> None:
        """With nothing left to start, move the highest running sequences into lower free
        slots: llama.cpp decodes only consecutive sequence ids as one ubatch (per-sequence
        caches), so a step over ids 0, 2, 3 would take two. A move copies the whole cache
        (at the next decode, before it runs); the values are the same bits."""
        while free and active and min(free) < max(active):
            hi, lo = max(active), min(free)
            self._share_prefix(hi, lo, active[hi].pos)    # all its cells: positions [0, pos)
            self._clear(hi)
            active[lo] = active.pop(hi)
            free.remove(lo)
            free.append(hi)

    def _start(self, st: _GenState, seq: int, active: dict[int, _GenState]) -> np.ndarray:
        """Prefill st's prompt into `seq`, reusing the cells of a running sequence's prompt
        where the prompts share a prefix; returns the logits after the prompt."""
        shared, src = 0, -1
        for s, other in active.items():
            k = _common_prefix(other.prompt, st.prompt, len(st.prompt) - _GRAIN)
            k -= k % _GRAIN
            if k > shared:
                shared, src = k, s
        if shared >= _MIN_SHARED:
            self._share_prefix(src, seq, shared)
        else:
            shared = 0
        st.pos = len(st.prompt)
        return self._prefill(st.prompt, seq, start=shared)

    def _advance(self, st: _GenState, row: np.ndarray, max_tokens: int) -> Optional[Generation]:
        tok, lp = self.sampler.sample(row, st.temperature, st.rng.random())
        st.tokens.append(tok)
        if self.chat.is_end_of_generation(tok):
            # The stop is one event whichever end token was drawn: its probability is theirs summed.
            st.logprobs.append(stop_logprob(row, self.chat.end_of_generation_tokens(), st.temperature))
            return Generation(st.tokens, st.logprobs, "stop")
        st.logprobs.append(lp)
        if len(st.tokens) >= max_tokens:
            return Generation(st.tokens, st.logprobs, "length")
        return None
