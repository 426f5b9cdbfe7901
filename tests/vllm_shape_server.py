"""Local test servers that answer in the shapes of engines that do not run on these machines
(vLLM, SGLang, TGI), every value computed by the real model in process.

Each follows its engine's source (read with the search tool; the engine modules in
ope_prep/backends/engines/ name the files):

* vLLM (vllm/entrypoints/openai/protocol.py, CompletionResponseChoice): /v1/completions with the
  prompt as token ids; ``prompt_logprobs`` one entry per prompt token, the first null, each
  {token id: {"logprob", "rank", "decoded_token"}}; ``return_tokens_as_token_ids`` giving tokens
  (and ``top_logprobs`` keys) as "token_id:N"; the stop token left out; ``max_tokens`` 0 refused.
  ``logprobs_mode`` as vLLM's --logprobs-mode: "raw_logprobs" (the default: the sampled token's
  value from the raw logits, whatever the temperature) or "processed_logprobs" (after temperature).
* SGLang (python/sglang/srt/managers/io_struct.py): /generate with ``input_ids``; ``meta_info``
  with ``output_token_logprobs`` [[logprob, id, null], ...] (the stop token included, with its own
  value), ``output_top_logprobs``, ``input_token_logprobs`` from ``logprob_start_len`` (the first
  null), ``finish_reason`` {"type": "stop", "matched": id} or {"type": "length", "length": n};
  ``max_new_tokens`` 0 allowed. Generated values after temperature, prompt values raw.
* TGI (router/src/lib.rs): /generate with text ``inputs``; ``details.prefill`` [{id, text,
  logprob}] (the first logprob null), ``details.tokens`` (the stop token included, special true),
  ``details.top_tokens``, ``finish_reason`` "eos_token" or "length"; ``top_n_tokens`` above 5
  refused (--max-top-n-tokens); top_p of 1.0 refused. Generated values after temperature, prefill raw.

Each also says what it serves, at its engine's route (GET): vLLM's /v1/models (``root``,
``max_model_len``), SGLang's /get_model_info (``model_path``, ``weight_version``), TGI's /info
(``model_id``, ``model_sha``, ``version``); ``about`` overrides those fields. ``port`` restarts a
server where an earlier one was. `Sharpened` is another model with the same tokenizer (a
fine-tune that sharpened the distribution), for a server whose weights changed under the same name.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import numpy as np

from fault_proxy import _Base


def sample(model, ids: list[int], temperature: float, seed: int, max_tokens: int, k: int, raw: bool = False):
    """The model's response to ids at temperature: (tokens, each token's own value at temperature
    (raw: at temperature 1), each position's k most likely [(id, value)], whether it stopped). The
    stop token is included, with its own value (an engine knows no stop event)."""
    gen = model.generate([(ids, temperature, seed)], max_tokens)[0]
    toks, stopped = list(gen.token_ids), gen.finish_reason == "stop"
    values = list(gen.token_logprobs)
    if raw and temperature != 1.0 and toks:
        values, temperature = model.teacher_force(ids, toks, 1.0), 1.0
    elif stopped:
        values[-1] = model.teacher_force(ids, toks, temperature)[-1]
    tops = [[] for _ in toks]
    if k > 1 and toks:       # (the pipeline asks 1 while generating, and reads the sampled token's own value)
        rows = model.answer_logprobs_many([ids + toks[:i] for i in range(len(toks))], list(range(model.n_vocab)))
        tops = []
        for row in rows:
            row = np.asarray(row, dtype=np.float64) / temperature
            row = row - np.logaddexp.reduce(row)
            tops.append([(int(i), float(row[i])) for i in np.argsort(row)[::-1][:k]])
    return toks, values, tops, stopped


class Sharpened:
    """``model`` with its logits multiplied by ``factor``: another model with the same tokenizer,
    sampled and teacher-forced consistently (a temperature T is the model's at T / factor)."""

    def __init__(self, model, factor: float):
        self.model, self.factor = model, factor
        self.chat, self.n_vocab = model.chat, model.n_vocab

    def generate(self, jobs, max_tokens):
        return self.model.generate([(ids, t / self.factor, seed) for ids, t, seed in jobs], max_tokens)

    def teacher_force(self, prompt, response, temperature, *stops):
        return self.model.teacher_force(prompt, response, temperature / self.factor, *stops)

    def answer_logprobs_many(self, prompts, candidates):
        return [np.asarray(row, dtype=np.float64) * self.factor
                for row in self.model.answer_logprobs_many(prompts, candidates)]


class _ModelServer(_Base):
    """Routes POST bodies to ``answer(path, request) -> (status, reply)``, one model call at a time,
    and GET ``identity_route`` to ``about(name)``."""
    identity_route = "/v1/models"

    def __init__(self, models: dict, about: dict | None = None, port: int = 0):
        """models: served name -> a LlamaModel (ope_prep.backends.llama) loaded in process."""
        self.models = models
        self.about_fields = about or {}
        self.model_lock = threading.Lock()
        super().__init__(port)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = self._read_body(h)
        if method == "GET":
            if h.path != self.identity_route:
                self._send(h, 404, b'{"error": "not found"}')
                return
            self._send(h, 200, json.dumps(self.about(next(iter(self.models)))).encode())
            return
        req = json.loads(body)
        with self.lock:
            self.counts["requests"] += 1
            self.requests_log.append(req)
        with self.model_lock:
            status, reply = self.answer(h.path, req)
        self._send(h, status, json.dumps(reply).encode())

    def about(self, name: str) -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": int(time.time()),
                                            "owned_by": "vllm", "root": f"/models/{m}", "parent": None,
                                            "max_model_len": 2048, **self.about_fields} for m in self.models]}

    def one_model(self):
        (model,) = self.models.values()     # native routes name no model: one model per server
        return model


class VllmShapeServer(_ModelServer):
    def __init__(self, models: dict, logprobs_mode: str = "raw_logprobs", about: dict | None = None, port: int = 0):
        self.logprobs_mode = logprobs_mode
        super().__init__(models, about, port)

    def answer(self, path: str, req: dict):
        model = self.models.get(req.get("model"))
        ids = req.get("prompt")
        if model is None or not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            return 400, {"error": {"message": "unknown model, or prompt is not token ids"}}
        if req.get("max_tokens", 16) < 1:
            return 400, {"error": {"message": "max_tokens must be at least 1"}}
        choice = self._choice(model, req, ids)
        n_out = len(choice["logprobs"]["tokens"]) if choice["logprobs"] else 0
        return 200, {"id": f"cmpl-{int(time.time() * 1000)}", "object": "text_completion",
                     "created": int(time.time()), "model": req["model"], "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids)}}

    def _choice(self, model, req: dict, ids: list[int]) -> dict:
        choice = {"index": 0, "text": "", "finish_reason": "length", "stop_reason": None, "logprobs": None}
        if req.get("prompt_logprobs") is not None:
            values = model.teacher_force(ids[:1], ids[1:], 1.0)
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": v, "rank": 1, "decoded_token": model.chat.detokenize([t])}}
                for t, v in zip(ids[1:], values)]
            return choice
        if req.get("top_k") not in (-1, 0) or req.get("top_p") != 1.0:
            raise AssertionError(f"sampling parameters that change the distribution: {req}")
        temperature = float(req["temperature"])
        k = int(req.get("logprobs") or 0)
        toks, lps, tops, stopped = sample(model, ids, temperature, int(req["seed"]), int(req["max_tokens"]),
                                          k, raw=self.logprobs_mode == "raw_logprobs")
        if stopped:
            toks, lps, tops = toks[:-1], lps[:-1], tops[:-1]          # vLLM leaves the stop token out
        extra = [i for i, t in enumerate(toks) if t in (req.get("stop_token_ids") or [])]
        if extra:              # vLLM's stop_token_ids: stop there too, the token left out
            toks, lps, tops, stopped = toks[:extra[0]], lps[:extra[0]], tops[:extra[0]], True
        top_maps = [{**{f"token_id:{i}": v for i, v in top}, f"token_id:{t}": lp} if top else None
                    for t, lp, top in zip(toks, lps, tops)]
        choice.update(text=model.chat.detokenize(toks), finish_reason="stop" if stopped else "length",
                      logprobs={"tokens": [f"token_id:{t}" for t in toks], "token_logprobs": lps,
                                "text_offset": [0] * len(toks), "top_logprobs": top_maps})
        return choice


class SglangShapeServer(_ModelServer):
    identity_route = "/get_model_info"

    def about(self, name: str) -> dict:
        return {"model_path": f"/models/{name}", "tokenizer_path": f"/models/{name}", "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default", **self.about_fields}

    def answer(self, path: str, req: dict):
        model, ids, params = self.one_model(), req.get("input_ids"), req.get("sampling_params") or {}
        if path != "/generate" or not isinstance(ids, list):
            return 404 if path != "/generate" else 400, {"error": {"message": "input_ids required"}}
        max_new = int(params.get("max_new_tokens", 128))
        meta = {"id": f"gen-{int(time.time() * 1000)}", "prompt_tokens": len(ids)}
        toks, values, tops, stopped = [], [], [], False
        if max_new > 0:
            toks, values, tops, stopped = sample(model, ids, float(params.get("temperature", 1.0)),
                                                 int(params.get("sampling_seed") or 0), max_new,
                                                 int(req.get("top_logprobs_num") or 0))
        meta.update(completion_tokens=len(toks),
                    finish_reason={"type": "stop", "matched": toks[-1]} if stopped
                    else {"type": "length", "length": len(toks)})
        if req.get("return_logprob"):
            start = int(req.get("logprob_start_len", -1))
            if start >= 0:
                raw = model.teacher_force(ids[:1], ids[1:], 1.0)
                meta["input_token_logprobs"] = [[v, t, None] for t, v in
                                                zip(ids[start:], ([None] + raw)[start:])]
            meta["output_token_logprobs"] = [[v, t, None] for t, v in zip(toks, values)]
            meta["output_top_logprobs"] = [[[v, i, None] for i, v in top] for top in tops]
        return 200, {"text": model.chat.detokenize(toks), "output_ids": toks, "meta_info": meta}


class TgiShapeServer(_ModelServer):
    identity_route = "/info"

    def about(self, name: str) -> dict:
        return {"model_id": name, "model_sha": "e985a63cdc139290c5f700ff1929f0b5942cced2",
                "model_dtype": "torch.float16", "model_device_type": "cpu", "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": 128, "max_input_tokens": 2047, "max_total_tokens": 2048,
                "version": "3.3.4", "sha": "9f38d93051f6d1e4ef1b8b4ac26e4ccbd4d3e7b0", **self.about_fields}

    def answer(self, path: str, req: dict):
        model, params = self.one_model(), req.get("parameters") or {}
        if path != "/generate" or not isinstance(req.get("inputs"), str):
            return 422, {"error": "inputs must be a string", "error_type": "validation"}
        if params.get("top_p") is not None and not 0 < params["top_p"] < 1:
            return 422, {"error": "`top_p` must be > 0.0 and < 1.0", "error_type": "validation"}
        if (params.get("top_n_tokens") or 0) > 5:
            return 422, {"error": "`top_n_tokens` must be >= 0 and <= 5", "error_type": "validation"}
        ids = model.chat.tokenize_template(req["inputs"])
        max_new = int(params.get("max_new_tokens") or 100)
        temperature = float(params.get("temperature") or 1.0) if params.get("do_sample") else None
        if temperature is None:        # greedy: the most likely token, as TGI's do_sample false
            gen_ids = [int(np.argmax(model.answer_logprobs_many([ids], list(range(model.n_vocab)))[0]))]
            toks, values, tops, stopped = gen_ids, model.teacher_force(ids, gen_ids, 1.0), [], False
        else:
            toks, values, tops, stopped = sample(model, ids, temperature, int(params.get("seed") or 0), max_new,
                                                 int(params.get("top_n_tokens") or 0))
        details = {"finish_reason": "eos_token" if stopped else "length", "generated_tokens": len(toks),
                   "seed": params.get("seed"),
                   "tokens": [{"id": t, "text": model.chat.detokenize([t]), "logprob": v,
                               "special": not model.chat.is_text_token(t)} for t, v in zip(toks, values)]}
        if params.get("decoder_input_details"):
            raw = [None] + model.teacher_force(ids[:1], ids[1:], 1.0)
            details["prefill"] = [{"id": t, "text": model.chat.detokenize([t]), "logprob": v}
                                  for t, v in zip(ids, raw)]
        if params.get("top_n_tokens"):
            details["top_tokens"] = [[{"id": i, "text": model.chat.detokenize([i]), "logprob": v,
                                       "special": not model.chat.is_text_token(i)} for i, v in top] for top in tops]
        return 200, {"generated_text": model.chat.detokenize(toks), "details": details if params.get("details") else None}
