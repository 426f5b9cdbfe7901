"""SGLang, through its native ``/generate`` route (python/sglang/srt/managers/io_struct.py,
GenerateReqInput; not run live here: tested against a server answering in its documented shape).

The prompt is sent as token ids (``input_ids``). With ``return_logprob``, ``meta_info`` holds
``output_token_logprobs`` ([logprob, token id, text] per generated token, the stop token included
when it was sampled), ``output_top_logprobs`` (the ``top_logprobs_num`` most likely per position)
and, from ``logprob_start_len`` on, ``input_token_logprobs`` (the first entry's value null).
Generated values are after temperature (SGLang's default, unless the server sets
SGLANG_RETURN_ORIGINAL_LOGPROB; the engine check, asked at each policy's temperature, tells). Prompt
log-probabilities are the raw logits' (temperature 1); teacher forcing is ``max_new_tokens`` 0.
"""

from __future__ import annotations

from ..replies import NativeRequest, Reply, RequestFailed
from .base import Engine, Sampled

NEUTRAL = {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
           "frequency_penalty": 0.0, "ignore_eos": False, "skip_special_tokens": False}


def _token_counts(raw: dict) -> tuple[int, int]:
    meta = raw.get("meta_info") or {}
    return int(meta.get("prompt_tokens") or 0), int(meta.get("completion_tokens") or 0)


def _meta(reply: Reply, key: str) -> list:
    rows = ((reply.raw or {}).get("meta_info") or {}).get(key)
    if not isinstance(rows, list):
        raise RequestFailed(f"meta_info has no {key} (return_logprob)", deterministic=True)
    return rows


class Sglang(Engine):
    name = "sglang"
    route = "generate"
    # /get_model_info: the model and tokenizer paths, and the weights' version (bumped by
    # /update_weights_from_disk: new weights under the same path and name)
    identity_route = "get_model_info"
    identity_fields = ("model_path", "tokenizer_path", "weight_version", "is_generation")

    def read_identity(self, raw):
        return self.fields(raw)

    def generation_request(self, prompt, temperature, seed, max_tokens, top_logprobs):
        body = {"input_ids": list(prompt), "return_logprob": True, "logprob_start_len": -1,
                "top_logprobs_num": top_logprobs, "stream": False,
                "sampling_params": {"max_new_tokens": max_tokens, "temperature": temperature,
                                    "sampling_seed": seed, **NEUTRAL}}
        return NativeRequest(self.route, body, len(prompt), max_tokens, _token_counts)

    def read_generation(self, reply: Reply, prompt) -> Sampled:
        meta = (reply.raw or {}).get("meta_info") or {}
        self.check_prompt_count(int(meta.get("prompt_tokens") or 0), prompt)
        finish = self.finish((meta.get("finish_reason") or {}).get("type"), ("stop",), ("length",))
        if finish == "stop" and not isinstance((meta.get("finish_reason") or {}).get("matched"), int):
            raise RequestFailed(f"finished on a stop string {meta['finish_reason'].get('matched')!r}, not "
                                "a token", deterministic=True)
        rows = _meta(reply, "output_token_logprobs")
        tops = meta.get("output_top_logprobs") or [None] * len(rows)
        ids = [int(r[1]) for r in rows]
        values = self.values([r[0] for r in rows], "a generated token")
        listing = [{"token": t, "logprob": v, "top": [[int(e[1]), e[0]] for e in top or []]}
                   for t, v, top in zip(ids, values, tops)]
        return Sampled(ids, values, finish, listing)

    def teacher_force_request(self, tokens):
        body = {"input_ids": list(tokens), "return_logprob": True, "logprob_start_len": 0, "stream": False,
                "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, **NEUTRAL}}
        return NativeRequest(self.route, body, len(tokens), 0, _token_counts)

    def read_teacher_force(self, reply: Reply, tokens, n_response) -> list[float]:
        rows = _meta(reply, "input_token_logprobs")
        if len(rows) != len(tokens) or [int(r[1]) for r in rows] != list(tokens):
            raise RequestFailed(f"input_token_logprobs lists {len(rows)} tokens, not the {len(tokens)} sent",
                                deterministic=True)
        return self.values([r[0] for r in rows[len(tokens) - n_response:]], "a response token")
