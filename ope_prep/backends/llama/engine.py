"""llama.cpp in process: the model, its context and decode loop, and its one numeric path.

Generation (generate.py) and teacher forcing (teacher_force.py) run on this `Engine`;
`LlamaModel` (the package's __init__) is both.

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
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

# Read once, at the first matrix product of the process: set before llama.cpp computes anything.
os.environ["GGML_CPU_TILED_MM"] = "0"

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from llama_cpp import _internals  # noqa: E402
from llama_cpp._logger import logger as _llama_logger  # noqa: E402

from .chat import ChatTokenizer  # noqa: E402
from .sampling import Sampler  # noqa: E402

_llama_logger.setLevel(logging.CRITICAL)   # llama.cpp prints pages per context; errors still raise

# What decides the kernels, recorded in the stages' fingerprints: a run resumed under another
# build, CPU or setting would mix two numeric paths, so it is refused.
NUMERIC_SETTINGS = {"flash_attn": False, "repacked_weights": False, "tiled_kquant_matmul": False}
BATCH_TOKENS = 512      # n_batch = n_ubatch: the most tokens per llama_decode call


def numeric_identity() -> dict[str, object]:
    """What decides the values' arithmetic (part of stages 2 and 2b's fingerprint)."""
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            **NUMERIC_SETTINGS}


# Logits rows requested per decode call are capped so the output buffer stays small:
# 32M floats = 128 MB (SmolLM2: ~650 rows, Gemma 3: 128 rows).
_MAX_OUTPUT_FLOATS = 32 * 1024 * 1024

# A shared prompt prefix shorter than this is decoded again rather than shared (sharing
# copies a sequence's whole cache, ~50 MB at n_ctx 2048: about the time of 2-3 tokens).
_MIN_SHARED = 8

# Batches are shaped so that even a kernel that tied a row's result to its neighbours would
# not change it: generation decodes at most _GRAIN - 1 tokens per llama_decode call, teacher
# forcing splits a sequence only at multiples of _GRAIN, into parts of at least _GRAIN tokens
# with no logits rows or at least _GRAIN. With NUMERIC_SETTINGS no kernel here does so (the
# tests check), but this keeps a future llama.cpp kernel of that kind from moving a value.
_GRAIN = 8


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


class Engine:
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
        params.n_batch = params.n_ubatch = BATCH_TOKENS
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
        # Teacher forcing keeps the prefix that every sequence of a call shared (a judge's rubric
        # and worked examples) in the last sequence id after the call: its tokens ([]: none), so
        # the next call that starts with them does not decode them again.
        self._kept_prefix: list[int] = []

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
        if seq in (-1, self.n_seq - 1):
            self._kept_prefix = []
        if self.trace:
            self.trace(("clear", seq))
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def _trim(self, seq: int, n: int) -> None:
        """Drop sequence seq's cells from position n on."""
        if self.trace:
            self.trace(("trim", seq, n))
        llama_cpp.llama_memory_seq_rm(self._memory, seq, n, -1)

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
        if dst == self.n_seq - 1:
            self._kept_prefix = []
        if self.trace:
            self.trace(("share", src, dst, n))
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, dst, n, -1)
