"""llama.cpp in process: temperature-only generation and teacher forcing from raw logits.

Why not `Llama.create_chat_completion` / `create_completion(echo=True, logprobs=...)`:
the high-level sampler applies top-k/top-p/min-p unless told otherwise, echo log-probabilities
are shifted by one position for models without BOS, and the call is about half as fast as
driving `llama_decode` directly. Here every log-probability is computed from the raw logits as
log softmax(logits / T), and sampling draws from exactly that distribution.

Speed (see benchmarks/bench_llama.py):

* generation decodes up to `n_seq` sequences per `llama_decode` call, refilling a slot as soon
  as its sequence ends; a prompt that shares a prefix with a running sequence's prompt (p0 and
  pi_clone render the same prompt) copies that sequence's KV cells instead of decoding them
  again; sampling touches the vocabulary with one exp and per-block sums, not a full cumsum.
* teacher forcing packs several sequences (distinct sequence ids) into each `llama_decode`
  batch of up to `n_batch` tokens, with logits only at response positions; identical
  (prompt, response) pairs are decoded once and scored at each requested temperature, and
  sequences whose prompts share a prefix decode it once, as tokens belonging to all of them.

Exactness: one numeric path per model. A token's logits must not depend on how many tokens or
sequences share its batch, or teacher forcing (hundreds of tokens per batch) would not
reproduce the sampler's log-probabilities (one token per sequence per step). llama.cpp picks
kernels by batch shape and weight layout; every one that does so is off here (NUMERIC_SETTINGS):

* llamafile's sgemm (setup.sh builds without it): another kernel for multi-token batches;
* the tiled K-quant matmul (GGML_CPU_TILED_MM=0): batches of >= 8 rows of Q4_K/Q5_K/Q6_K
  weights took it, 1-row batches did not (measured: up to 1.1 nats on one token);
* repacked weights (use_extra_bufts off): rows computed in groups of 4 or 8 (Q4_0, Q4_K);
* flash attention: its kernel for one query row differs from the one for many.

With these, teacher forcing equals sampling to the last bit on Q4_0, Q4_1, Q4_K_M, Q5_K_M and
Q8_0 (tests/test_llama_exactness.py), and stage 5 checks it again on every run.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

# Read once, at the first matrix product of the process: set before llama.cpp computes anything.
os.environ["GGML_CPU_TILED_MM"] = "0"

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from llama_cpp import _internals  # noqa: E402
from llama_cpp._logger import logger as _llama_logger  # noqa: E402

from .chat import ChatTokenizer  # noqa: E402
from .sampling import Sampler, token_logprobs  # noqa: E402

_llama_logger.setLevel(logging.CRITICAL)   # llama.cpp prints pages per context; errors still raise

# What decides the kernels, recorded in the stages' fingerprints: a run resumed under another
# build, CPU or setting would mix two numeric paths, so it is refused.
NUMERIC_SETTINGS = {"flash_attn": False, "repacked_weights": False, "tiled_kquant_matmul": False}


def numeric_identity() -> dict[str, object]:
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            **NUMERIC_SETTINGS}


# Logits rows requested per decode call are capped so the output buffer stays small:
# 32M floats = 128 MB (SmolLM2: ~650 rows, Gemma 3: 128 rows).
_MAX_OUTPUT_FLOATS = 32 * 1024 * 1024

# Sampling finds the drawn token block by block: block sums, then one block's running sum.
_BLOCK = 1024

# Rows per numpy pass when scoring logits, so temporaries stay small (Gemma 3: 16 MB).
_ROWS_PER_PASS = 16

# A shared prompt prefix shorter than this is decoded again rather than shared (sharing
# copies a sequence's whole cache, ~50 MB at n_ctx 2048: about the time of 2-3 tokens).
_MIN_SHARED = 8

# Batches are shaped so that even a kernel that tied a row's result to its neighbours would
# not change it: generation decodes at most _GRAIN - 1 tokens per llama_decode call, teacher
# forcing splits a sequence only at multiples of _GRAIN, into parts of at least _GRAIN tokens
# with no logits rows or at least _GRAIN. With NUMERIC_SETTINGS no kernel here does so (the
# tests check), but this keeps a future llama.cpp kernel of that kind from moving a value.
_GRAIN = 8


@dataclass
class Generation:
    token_ids: list[int]      # sampled tokens, the end-of-generation token included if sampled
    token_logprobs: list[float]   # log softmax(logits / T) of each, as the sampler drew it
    finish_reason: str        # "stop" or "length"

    @property
    def logprob(self) -> float:
        return math.fsum(self.token_logprobs)


class PromptTooLong(ValueError):
    pass


def check_build() -> None:
    if b"LLAMAFILE = 1" in llama_cpp.llama_print_system_info():
        print("warning: llama-cpp-python was built with llamafile's sgemm: teacher-forced and sampling "
              "log-probabilities will disagree by ~1e-2 nats/token; run setup.sh to rebuild it",
              file=sys.stderr)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _GenState:
    job: int
    prompt: list[int]
    temperature: float
    rng: np.random.Generator
    pos: int = 0                                   # next position to decode
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class _TFSeq:
    """One distinct (prompt, response) token sequence to teacher-force."""
    tokens: list[int]
    n_prompt: int
    requests: list[tuple[int, float]] = field(default_factory=list)   # (item index, temperature)
    values: dict[float, np.ndarray] = field(default_factory=dict)     # temperature -> per token

    @property
    def end(self) -> int:
        # Every token is decoded, the last too (its logits predict nothing): the batches then
        # end where a whole-sequence evaluation's does, as _GRAIN asks.
        return len(self.tokens)

    @property
    def first_out(self) -> int:    # the logits at this position predict the first response token
        return self.n_prompt - 1

    @property
    def stop_out(self) -> int:     # logits are wanted at positions [first_out, stop_out)
        return len(self.tokens) - 1


@dataclass
class _TFStream:
    """Positions [cursor, end) of one sequence still to decode into cache/sequence id `seq`."""
    seq: int
    seq_data: _TFSeq
    cursor: int

    @property
    def end(self) -> int:
        return self.seq_data.end


class LlamaModel:
    """One GGUF model loaded once, serving every policy that uses it.

    Up to n_seq sequences are in flight at once, each with its own cache of n_ctx cells
    (kv_unified off). Attention then runs over a sequence's own tokens only, and a token's
    logits do not depend on where its cells lie. With one unified cache they do, in this
    llama.cpp (0.3.36): a sequence decoded in cells after another sequence's got logits up to
    ~0.9 off, so the unified cache is not used.

    The model's tokenizer and chat template are `self.chat` (a ChatTokenizer).
    """

    def __init__(self, path: Path | str, n_ctx: int, n_threads: int = 2, n_seq: int = 1,
                 chat_template: Optional[str] = None):
        llama_cpp.llama_backend_init()
        check_build()
        self.path = str(path)
        self.n_seq = n_seq
        self.n_ctx_per_seq = n_ctx
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = NUMERIC_SETTINGS["repacked_weights"]
        self.model = _internals.LlamaModel(path_model=self.path, params=mparams, verbose=False)
        self.chat = ChatTokenizer(self.model, self.path, chat_template)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = n_seq
        params.kv_unified = False         # each sequence its own n_ctx cells (see above)
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED   # see NUMERIC_SETTINGS
        self.ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.n_batch = params.n_batch
        self.n_vocab = self.model.n_vocab()
        self.max_outputs = max(1, min(self.n_batch, _MAX_OUTPUT_FLOATS // self.n_vocab))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, max(1, n_seq))
        self._b_token = np.ctypeslib.as_array(self.batch.token, shape=(self.n_batch,))
        self._b_pos = np.ctypeslib.as_array(self.batch.pos, shape=(self.n_batch,))
        self._b_nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(self.n_batch,))
        self._b_logits = np.ctypeslib.as_array(self.batch.logits, shape=(self.n_batch,))
        self.sampler = Sampler(self.n_vocab)
        # Called with each decode batch and cache operation of teacher forcing, ("decode",
        # entries), ("clear", seq), ("share", src, dst, n): how the benchmark replays them raw.
        self.trace: Optional[Callable[[tuple], None]] = None

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()
        self.model.close()

    # ---- decoding -------------------------------------------------------------------
    @property
    def _memory(self):
        return self.ctx.memory

    def _clear(self, seq: int = -1) -> None:
        if self.trace:
            self.trace(("clear", seq))
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def _decode(self, entries: list[tuple[int, int, Union[int, tuple[int, ...]], bool]]) -> None:
        """entries: (token, position, sequence id or ids, want logits)."""
        b = self.batch
        n = len(entries)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a decode batch of {n} tokens (1..{self.n_batch} allowed)")
        toks, poss, seqs, wants = zip(*entries)
        self._b_token[:n] = toks
        self._b_pos[:n] = poss
        self._b_logits[:n] = wants
        seq_id = b.seq_id
        for i, s in enumerate(seqs):
            if isinstance(s, int):
                seq_id[i][0] = s
                self._b_nseq[i] = 1
            else:
                for k, sk in enumerate(s):
                    seq_id[i][k] = sk
                self._b_nseq[i] = len(s)
        b.n_tokens = n
        if self.trace:
            self.trace(("decode", list(entries)))
        rc = llama_cpp.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _row(self, i: int) -> np.ndarray:
        """The logits of batch entry i (-1: the last), a view valid until the next decode."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx.ctx, i)
        if not ptr:
            raise RuntimeError(f"no logits for batch entry {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _rows(self, first: int, n: int) -> np.ndarray:
        """The logits of batch entries first..first+n-1 (all requested), as one (n, V) array."""
        p0 = ctypes.cast(llama_cpp.llama_get_logits_ith(self.ctx.ctx, first), ctypes.c_void_p).value
        p1 = ctypes.cast(llama_cpp.llama_get_logits_ith(self.ctx.ctx, first + n - 1), ctypes.c_void_p).value
        if p0 and p1 == p0 + (n - 1) * self.n_vocab * 4:       # contiguous: a view, no copy
            return np.ctypeslib.as_array(ctypes.cast(p0, ctypes.POINTER(ctypes.c_float)),
                                         shape=(n, self.n_vocab))
        return np.stack([self._row(first + k) for k in range(n)])

    def _prefill(self, tokens: list[int], seq: int, start: int = 0) -> np.ndarray:
        """Decode tokens[start:] into `seq` (start a multiple of _GRAIN) in batches of up to
        n_batch tokens, the last at least _GRAIN; returns the logits after the last token
        (a view, valid until the next decode)."""
        pos, end = start, len(tokens)
        while pos < end:
            stop = min(pos + self.n_batch, end)
            if 0 < end - stop < _GRAIN:
                stop = end - _GRAIN
                stop -= stop % _GRAIN
            self._decode([(tokens[p], p, seq, p == end - 1) for p in range(pos, stop)])
            pos = stop
        return self._row(-1)

    def _share_prefix(self, src: int, dst: int, n: int) -> None:
        """Give sequence dst the cells of src's positions [0, n) (dst is empty)."""
        # Between per-sequence caches llama.cpp copies whole caches (at the next decode, before
        # it runs); the copy's positions from n on are then dropped.
        if self.trace:
            self.trace(("share", src, dst, n))
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, dst, n, -1)

    # ---- generation -----------------------------------------------------------------
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
            llama_cpp.llama_memory_seq_cp(self._memory, hi, lo, -1, -1)
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
        st.logprobs.append(lp)
        if self.chat.is_end_of_generation(tok):
            return Generation(st.tokens, st.logprobs, "stop")
        if len(st.tokens) >= max_tokens:
            return Generation(st.tokens, st.logprobs, "length")
        return None

    # ---- teacher forcing ------------------------------------------------------------
    def teacher_force(self, prompt: list[int], response: list[int], temperature: float) -> list[float]:
        """Per-token log softmax(logits / T) of `response` after `prompt`, from raw logits."""
        result = self.teacher_force_many([(prompt, response, temperature)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def teacher_force_many(self, items: Sequence[tuple[Sequence[int], Sequence[int], float]]
                           ) -> list[Union[list[float], ValueError]]:
        """Per-token log softmax(logits / T) of each (prompt, response, temperature) item's
        response after its prompt, from raw logits; or, for an item that cannot be scored
        (too long for the context, empty prompt), the ValueError saying why.

        Items with identical prompt and response tokens are decoded once and scored at each of
        their temperatures: equal inputs give equal logits, and anything that differs (the
        rendered prompt, the response, the temperature) is computed on its own.
        """
        results: list = [None] * len(items)
        distinct: dict[tuple, _TFSeq] = {}
        for i, (prompt, response, temp) in enumerate(items):
            prompt, response = list(prompt), list(response)
            if not temp > 0:
                results[i] = ValueError(f"temperature must be positive (got {temp})")
            elif not response:
                results[i] = []
            elif not prompt:
                results[i] = ValueError("empty prompt")
            elif len(prompt) + len(response) > self.n_ctx_per_seq:
                results[i] = PromptTooLong(f"prompt + response of {len(prompt) + len(response)} "
                                           f"tokens exceed the context of {self.n_ctx_per_seq}")
            else:
                key = (tuple(prompt), tuple(response))
                sq = distinct.get(key)
                if sq is None:
                    sq = distinct[key] = _TFSeq(prompt + response, len(prompt))
                sq.requests.append((i, float(temp)))
        seqs = list(distinct.values())
        for sq in seqs:
            for _, temp in sq.requests:
                sq.values.setdefault(temp, np.empty(len(sq.tokens) - sq.n_prompt))
        if seqs:
            self._teacher_force_packed(seqs)
        for sq in seqs:
            for i, temp in sq.requests:
                results[i] = sq.values[temp].tolist()
        return results

    def _groups(self, seqs: list[_TFSeq]) -> list[tuple[list[_TFSeq], int]]:
        """Runs of consecutive sequences whose prompts share a prefix of >= _MIN_SHARED tokens
        before any scored position (and >= _GRAIN positions before their end), with the length
        they all share, a multiple of _GRAIN."""
        groups: list[tuple[list[_TFSeq], int]] = []
        for sq in seqs:
            if groups and len(groups[-1][0]) < self.n_seq:
                members, shared = groups[-1]
                lead = members[0]
                k = _common_prefix(lead.tokens, sq.tokens,
                                   min(lead.first_out, sq.first_out, sq.end - _GRAIN))
                k -= k % _GRAIN
                if k >= _MIN_SHARED:
                    groups[-1] = (members + [sq], min(shared, k) if len(members) > 1 else k)
                    continue
            groups.append(([sq], 0))
        return groups

    def _teacher_force_packed(self, seqs: list[_TFSeq]) -> None:
        """Decode the sequences, several per llama_decode call (up to n_batch tokens, each
        sequence its own id and cache), requesting logits only where they predict a response
        token.

        Entries go in descending sequence id, so llama.cpp computes each sequence's part as
        a ubatch of its own, and a sequence is split only at multiples of _GRAIN, into parts
        of at least _GRAIN tokens: each sequence is computed as in one batch on its own.
        A group of sequences sharing a prompt prefix decodes it once, in its first sequence;
        the others then copy that sequence's cache cells and decode only their own rest.
        """
        groups = deque(self._groups(seqs))
        free = list(range(self.n_seq))
        active: list[_TFStream] = []
        waiting: list[tuple[_TFStream, _TFStream, int]] = []   # (lead, member, shared length)
        self._clear()
        try:
            while groups or active or waiting:
                while groups and len(free) >= len(groups[0][0]):
                    members, shared = groups.popleft()
                    streams = [_TFStream(free.pop(0), sq, shared) for sq in members]
                    streams[0].cursor = 0
                    active.append(streams[0])
                    waiting.extend((streams[0], st, shared) for st in streams[1:])
                entries: list[tuple] = []
                plan: list[tuple[_TFStream, int, int, int]] = []  # stream, entry index, pos, n outputs
                n_tok, n_out = self.n_batch, self.max_outputs
                for st in sorted(active, key=lambda st: -st.seq):
                    n = self._chunk(st, n_tok, n_out, first=not entries)
                    if n == 0:
                        continue
                    sq = st.seq_data
                    o0, o1 = self._output_rows(sq, st.cursor, st.cursor + n)
                    plan.append((st, len(entries) + o0 - st.cursor, o0, o1 - o0))
                    entries.extend((sq.tokens[p], p, st.seq, o0 <= p < o1)
                                   for p in range(st.cursor, st.cursor + n))
                    st.cursor += n
                    n_tok -= n
                    n_out -= o1 - o0
                if not entries:
                    raise RuntimeError("teacher forcing made no progress")
                self._decode(entries)
                for st, first, pos, rows in plan:
                    if rows:
                        self._score(st.seq_data, first, pos, rows)
                # Members whose shared prefix is now in their lead's cache start from a copy of it
                # (before a finished lead's cells are released).
                for lead, member, shared in [w for w in waiting if w[0].cursor >= w[2]]:
                    self._share_prefix(lead.seq, member.seq, shared)
                    active.append(member)
                waiting = [w for w in waiting if w[0].cursor < w[2]]
                for st in [st for st in active if st.cursor == st.end]:
                    self._clear(st.seq)
                    free.append(st.seq)
                active = [st for st in active if st.cursor < st.end]
                free.sort()
        finally:
            self._clear()

    @staticmethod
    def _output_rows(sq: _TFSeq, start: int, stop: int) -> tuple[int, int]:
        """The positions [o0, o1) of part [start, stop) that get logits rows: the scored ones,
        widened to _GRAIN rows (extra rows are not used) when there are fewer but some."""
        o0, o1 = max(start, sq.first_out), min(stop, sq.stop_out)
        if o0 >= o1:
            return start, start
        if o1 - o0 < _GRAIN:
            o0 = max(start, o1 - _GRAIN)
            o1 = min(stop, o0 + _GRAIN)
        return o0, o1

    def _chunk(self, st: _TFStream, n_tok: int, n_out: int, first: bool) -> int:
        """How many of st's next positions go in a batch with n_tok tokens and n_out logits
        rows left (0: none). A part that does not finish the sequence ends at a multiple of
        _GRAIN and leaves at least _GRAIN; every part has at least _GRAIN tokens."""
        sq = st.seq_data
        left = st.end - st.cursor
        fits = min(left, n_tok, max(0, sq.first_out - st.cursor) + n_out)
        if st.cursor + fits == sq.stop_out and fits < n_tok:
            fits += 1    # the last token wants no logits
        n = fits
        if n < left:
            stop = min(st.cursor + n, st.end - _GRAIN)
            n = stop - stop % _GRAIN - st.cursor
        if n >= min(left, _GRAIN):
            o0, o1 = self._output_rows(sq, st.cursor, st.cursor + n)
            if o1 - o0 <= n_out:
                return n
        # Only a vocabulary so large that fewer than _GRAIN rows fit in the output buffer
        # gets here with an empty batch: then take what fits.
        return max(1, fits) if first else 0

    def _score(self, sq: _TFSeq, first_entry: int, pos: int, n: int) -> None:
        """Log-probabilities of the response tokens predicted by the logits rows of batch
        entries first_entry.. (positions pos..pos+n-1; rows outside the response unused)."""
        rows = self._rows(first_entry, n)
        a, b = max(pos, sq.first_out), min(pos + n, sq.stop_out)
        targets = sq.tokens[a + 1:b + 1]
        k = a - sq.first_out
        for temp, values in sq.values.items():
            values[k:k + b - a] = token_logprobs(rows[a - pos:b - pos], targets, temp)
