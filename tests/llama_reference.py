"""llama.cpp's own evaluation of one whole sequence in one batch, with the pipeline's numeric
settings, written here without the backend's packing code: the reference the fast paths meet."""

from __future__ import annotations

import numpy as np
import llama_cpp
from llama_cpp import _internals

import ope_prep.backends.llama.engine  # noqa: F401  - sets GGML_CPU_TILED_MM before any compute
from ope_prep.backends.llama.engine import NUMERIC_SETTINGS


class WholeSequence:
    def __init__(self, path: str, n_ctx: int = 1024):
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = NUMERIC_SETTINGS["repacked_weights"]
        self.model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=False)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = 2
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = _internals.LlamaContext(model=self.model, params=cp, verbose=False)
        self.n_ctx, self.n_vocab = n_ctx, self.model.n_vocab()

    def logprobs(self, prompt: list[int], response: list[int], temperature: float,
                 stop_tokens: list[int] | None = None) -> np.ndarray:
        """Per-token log softmax(logits / T) of response after prompt, in float64; with
        stop_tokens, the last value is the stop event's (any of them next: their log-sum-exp)."""
        tokens = list(prompt) + list(response)
        assert len(tokens) <= self.n_ctx
        llama_cpp.llama_memory_clear(self.ctx.memory, True)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i >= len(prompt) - 1
            batch.n_tokens = len(tokens)
            assert llama_cpp.llama_decode(self.ctx.ctx, batch) == 0
            rows = np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, len(prompt) - 1 + k),
                                                   shape=(self.n_vocab,)).astype(np.float64)
                             for k in range(len(response))])
        finally:
            llama_cpp.llama_batch_free(batch)
        z = rows / temperature
        z -= z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        out = lp[np.arange(len(response)), response]
        if stop_tokens:
            out[-1] = np.logaddexp.reduce(lp[-1, stop_tokens])
        return out

    def close(self) -> None:
        self.ctx.close()
        self.model.close()
