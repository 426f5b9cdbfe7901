"""A local test server that answers /v1/completions in vLLM's shape, computed by the real model
in process (no vLLM runs on these machines).

The shape follows vLLM's OpenAI-compatible server (vllm/entrypoints/openai/protocol.py,
CompletionResponseChoice): a prompt given as token ids; ``prompt_logprobs`` (a request extension)
returned on the choice as one entry per prompt token, the first null, each a mapping
{token id: {"logprob", "rank", "decoded_token"}} that holds the prompt's own token;
``return_tokens_as_token_ids`` giving generated tokens (and the keys of ``top_logprobs``, the
``logprobs`` most likely tokens at each position and the sampled one) as "token_id:N"; the stop
token not among the generated tokens; ``max_tokens`` 0 refused. Values come from the model's raw logits
(temperature 1), as vLLM's prompt log-probabilities do.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import numpy as np

from fault_proxy import _Base


class VllmShapeServer(_Base):
    def __init__(self, models: dict):
        """models: served name -> a LlamaModel (ope_prep.backends.llama) loaded in process."""
        self.models = models
        self.model_lock = threading.Lock()
        super().__init__()

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = self._read_body(h)
        if method == "GET":
            self._send(h, 200, json.dumps({"object": "list", "data": [{"id": m} for m in self.models]}).encode())
            return
        req = json.loads(body)
        with self.lock:
            self.counts["requests"] += 1
            self.requests_log.append(req)
        model = self.models.get(req.get("model"))
        ids = req.get("prompt")
        if model is None or not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            self._send(h, 400, b'{"error": {"message": "unknown model, or prompt is not token ids"}}')
            return
        if req.get("max_tokens", 16) < 1:
            self._send(h, 400, b'{"error": {"message": "max_tokens must be at least 1"}}')
            return
        with self.model_lock:
            choice = self._choice(model, req, ids)
        reply = {"id": f"cmpl-{int(time.time() * 1000)}", "object": "text_completion",
                 "created": int(time.time()), "model": req["model"], "choices": [choice],
                 "usage": {"prompt_tokens": len(ids), "completion_tokens": len(choice["logprobs"]["tokens"])
                           if choice["logprobs"] else 0, "total_tokens": len(ids)}}
        self._send(h, 200, json.dumps(reply).encode())

    @staticmethod
    def _choice(model, req: dict, ids: list[int]) -> dict:
        choice = {"index": 0, "text": "", "finish_reason": "length", "stop_reason": None, "logprobs": None}
        if req.get("prompt_logprobs") is not None:
            values = model.teacher_force(ids[:1], ids[1:], 1.0)
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": v, "rank": 1, "decoded_token": model.chat.detokenize([t])}}
                for t, v in zip(ids[1:], values)]
            return choice
        if req.get("temperature") != 1.0 or req.get("top_k") not in (-1, 0) or req.get("top_p") != 1.0:
            raise AssertionError(f"sampling parameters that change the distribution: {req}")
        gen = model.generate([(ids, 1.0, int(req["seed"]))], int(req["max_tokens"]))[0]
        stopped = gen.finish_reason == "stop"
        toks = gen.token_ids[:-1] if stopped else gen.token_ids      # vLLM leaves the stop token out
        extra = [i for i, t in enumerate(toks) if t in (req.get("stop_token_ids") or [])]
        if extra:              # vLLM's stop_token_ids: stop there too, the token left out
            toks, stopped = toks[:extra[0]], True
        lps = gen.token_logprobs[:len(toks)]
        k = int(req.get("logprobs") or 0)
        tops = [None] * len(toks)
        if k > 1 and toks:     # the k most likely tokens at each position (and the sampled one)
            rows = model.answer_logprobs_many([ids + toks[:i] for i in range(len(toks))],
                                              list(range(model.n_vocab)))
            tops = []
            for t, lp, row in zip(toks, lps, rows):
                best = np.argsort(row)[::-1][:k]
                tops.append({**{f"token_id:{int(i)}": float(row[i]) for i in best}, f"token_id:{t}": lp})
        choice.update(text=model.chat.detokenize(toks), finish_reason="stop" if stopped else gen.finish_reason,
                      logprobs={"tokens": [f"token_id:{t}" for t in toks], "token_logprobs": lps,
                                "text_offset": [0] * len(toks), "top_logprobs": tops})
        return choice
