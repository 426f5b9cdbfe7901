"""llama.cpp in process: chat rendering, temperature-only sampling, teacher forcing from raw logits.

Why not `Llama.create_chat_completion` / `create_completion(echo=True, logprobs=...)`:
the high-level sampler applies top-k/top-p/min-p unless told otherwise, echo log-probabilities
are shifted by one position for models without BOS, and the call is about half as fast as
driving `llama_decode` directly. Here every log-probability is computed from the raw logits as
log softmax(logits / T), and sampling draws from exactly that distribution.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jinja2.sandbox
import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp._logger import logger as _llama_logger

_llama_logger.setLevel(logging.CRITICAL)   # llama.cpp prints pages per context; errors still raise

# Private-use code points: they never occur in the templates, so they mark where the
# system prompt and the user text go, and those parts are tokenized as text.
_SYSTEM_MARK = "\ue000SYSTEM\ue001"
_USER_MARK = "\ue000USER\ue001"
_ASSISTANT_MARK = "\ue000ASSISTANT\ue001"

# Logits rows requested per decode call are capped so the output buffer stays small:
# 32M floats = 128 MB (SmolLM2: ~650 rows, Gemma 3: 128 rows).
_MAX_OUTPUT_FLOATS = 32 * 1024 * 1024


@dataclass
class Generation:
    token_ids: list[int]      # sampled tokens, the end-of-generation token included if sampled
    logprob: float            # sum of log softmax(logits / T) over token_ids
    finish_reason: str        # "stop" or "length"


class PromptTooLong(ValueError):
    pass


def log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def check_build() -> None:
    if b"LLAMAFILE = 1" in llama_cpp.llama_print_system_info():
        print("warning: llama-cpp-python was built with llamafile's sgemm: teacher-forced and sampling "
              "log-probabilities will disagree by ~1e-2 nats/token; run setup.sh to rebuild it",
              file=sys.stderr)


class LlamaModel:
    """One GGUF model loaded once, serving every policy that uses it."""

    def __init__(self, path: Path | str, n_ctx: int, n_threads: int = 2, n_seq: int = 1,
                 chat_template: Optional[str] = None):
        llama_cpp.llama_backend_init()
        check_build()
        self.path = str(path)
        self.n_seq = n_seq
        self.n_ctx_per_seq = n_ctx
        self.model = _internals.LlamaModel(path_model=self.path,
                                           params=llama_cpp.llama_model_default_params(),
                                           verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = n_seq
        params.kv_unified = False         # each sequence its own n_ctx cells: faster attention
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        # Flash attention's kernel for one query row differs from its kernel for many, so a
        # token's logits would depend on how many tokens shared its batch; without it (and
        # with llamafile's sgemm off at build time, see setup.sh) teacher forcing a response
        # in large batches reproduces the logits of one-token-at-a-time sampling exactly.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.n_batch = params.n_batch
        self.n_vocab = self.model.n_vocab()
        self.max_outputs = max(1, min(self.n_batch, _MAX_OUTPUT_FLOATS // self.n_vocab))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.vocab = self.model.vocab
        template = chat_template or self.model.metadata().get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path}: the GGUF file has no chat template; set the model's "
                             "chat_template in the config")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(template)
        self.bos_text = self._piece(self.model.token_bos())
        self.eos_text = self._piece(self.model.token_eos())
        self.end_of_turn = self._end_of_turn_token()

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()
        self.model.close()

    # ---- text <-> tokens -----------------------------------------------------------
    def _piece(self, token: int) -> str:
        return self.model.token_to_piece(token, special=True).rstrip(b"\0").decode("utf-8", "replace")

    def tokenize_text(self, text: str) -> list[int]:
        """User or model text: special-token strings in it stay text (no template injection)."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _tokenize_template(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._piece_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def _piece_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 256, 0, False)
        return buf.raw[:max(n, 0)]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_text, eos_token=self.eos_text)

    def _end_of_turn_token(self) -> int:
        """The token the chat template puts after an assistant turn (<|im_end|>, <end_of_turn>)."""
        text = self._render([{"role": "user", "content": "x"},
                             {"role": "assistant", "content": _ASSISTANT_MARK}], False)
        tail = self._tokenize_template(text.split(_ASSISTANT_MARK, 1)[1])
        if not tail or not self.is_end_of_generation(tail[0]):
            eot = self.model.token_eot()
            return eot if eot >= 0 else self.model.token_eos()
        return tail[0]

    def prompt_tokens(self, system_prompt: str, user_text: str) -> list[int]:
        """The policy's rendered prompt, as at generation: template parts may hold special
        tokens, the system prompt and the user text are tokenized as plain text."""
        text = self._render([{"role": "system", "content": _SYSTEM_MARK},
                             {"role": "user", "content": _USER_MARK}], True)
        if text.count(_SYSTEM_MARK) != 1 or text.count(_USER_MARK) != 1:
            raise ValueError(f"{self.path}: the chat template does not place the system prompt "
                             "and the user message exactly once")
        head, rest = text.split(_SYSTEM_MARK)
        if _USER_MARK in head:    # a template that puts the user turn first
            raise ValueError(f"{self.path}: the chat template puts the user turn before the system prompt")
        middle, tail = rest.split(_USER_MARK)
        tokens = (self._tokenize_template(head) + self.tokenize_text(system_prompt)
                  + self._tokenize_template(middle) + self.tokenize_text(user_text)
                  + self._tokenize_template(tail))
        if self.model.add_bos_token() and (not tokens or tokens[0] != self.model.token_bos()):
            tokens = [self.model.token_bos()] + tokens
        return tokens

    def response_tokens(self, text: str, stopped: bool) -> list[int]:
        """Another model's response text in this model's tokens, with this model's end-of-turn
        token when the response ended by itself. The round trip must give the text back."""
        tokens = self.tokenize_text(text)
        if self.detokenize(tokens) != text:
            raise ValueError("response text does not survive this model's tokenizer round trip")
        return tokens + [self.end_of_turn] if stopped else tokens

    # ---- decoding -------------------------------------------------------------------
    def _clear(self, seq: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self.ctx.memory, seq, -1, -1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence id, want logits)."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _logits(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _prefill(self, tokens: list[int], seq: int, start: int = 0) -> np.ndarray:
        """Decode tokens[start:] into `seq`; returns the logits after the last token."""
        for i in range(start, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            last = i + len(chunk) == len(tokens)
            self._decode([(t, i + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])
        return self._logits(-1)

    def generate(self, jobs: list[tuple[list[int], float, int]], max_tokens: int) -> list[Generation]:
        """Sample one response per (prompt_tokens, temperature, seed), several sequences at once.

        Each job's randomness comes only from its own seed, and each token is drawn from
        softmax(logits / T) with nothing else applied, so the recorded log-probability is the
        true sampling probability.
        """
        results: list[Optional[Generation]] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        active: dict[int, dict] = {}   # seq id -> state
        free_seqs = list(range(self.n_seq))
        self._clear()
        while pending or active:
            while pending and free_seqs:
                j = pending.pop(0)
                prompt, temp, seed = jobs[j]
                if len(prompt) + max_tokens > self.n_ctx_per_seq:
                    raise PromptTooLong(f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} "
                                        f"exceeds the context of {self.n_ctx_per_seq}")
                seq = free_seqs.pop(0)
                logits = self._prefill(prompt, seq)
                active[seq] = {"job": j, "pos": len(prompt), "temp": temp, "logits": logits,
                               "rng": np.random.default_rng(seed), "tokens": [], "logprob": 0.0}
            step = []
            for seq, st in list(active.items()):
                lp = log_softmax(st["logits"], st["temp"])
                probs = np.exp(lp)
                tok = int(np.searchsorted(np.cumsum(probs), st["rng"].random() * probs.sum(), side="right"))
                tok = min(tok, self.n_vocab - 1)
                st["tokens"].append(tok)
                st["logprob"] += float(lp[tok])
                done = None
                if self.is_end_of_generation(tok):
                    done = "stop"
                elif len(st["tokens"]) >= max_tokens:
                    done = "length"
                if done:
                    results[st["job"]] = Generation(st["tokens"], st["logprob"], done)
                    del active[seq]
                    self._clear(seq)
                    free_seqs.append(seq)
                else:
                    step.append(seq)
            if step:
                self._decode([(active[s]["tokens"][-1], active[s]["pos"], s, True) for s in step])
                for i, s in enumerate(step):
                    active[s]["pos"] += 1
                    active[s]["logits"] = self._logits(i)
        return results  # type: ignore[return-value]

    def teacher_force(self, prompt: list[int], response: list[int], temperature: float) -> list[float]:
        """Per-token log softmax(logits / T) of `response` after `prompt`, from raw logits."""
        if not response:
            return []
        if len(prompt) + len(response) > self.n_ctx_per_seq:
            raise PromptTooLong(f"prompt + response of {len(prompt) + len(response)} tokens exceed "
                                f"the context of {self.n_ctx_per_seq}")
        self._clear()
        tokens = prompt + response
        # Positions whose logits predict a response token: len(prompt)-1 .. len(tokens)-2.
        first_out = len(prompt) - 1
        self._prefill_no_logits(tokens[:first_out])
        out: list[float] = []
        pos = first_out
        while pos < len(tokens) - 1:
            n = min(self.max_outputs, len(tokens) - 1 - pos)
            self._decode([(tokens[pos + j], pos + j, 0, True) for j in range(n)])
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx.ctx), shape=(n, self.n_vocab))
            lp = log_softmax(rows, temperature)
            targets = tokens[pos + 1:pos + 1 + n]
            out.extend(float(x) for x in lp[np.arange(n), targets])
            pos += n
        return out

    def _prefill_no_logits(self, tokens: list[int]) -> None:
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            self._decode([(t, i + j, 0, False) for j, t in enumerate(chunk)])

