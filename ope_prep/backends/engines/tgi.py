"""Hugging Face text-generation-inference, through its native ``/generate`` route (router/src/lib.rs,
GenerateParameters and Details; not run live here: tested against a server answering in its
documented shape).

TGI takes text, not token ids: the prompt is sent as the text of its tokens (control tokens
spelled), and ``decoder_input_details`` returns the ids TGI read (``details.prefill``), which must
be the prompt's, else the request is refused. ``details.tokens`` are the generated tokens with
their log-probabilities after the logits warpers (here temperature alone: no top-k, top-p,
typical-p or repetition penalty sent), the end-of-sequence token included (``finish_reason``
"eos_token"); ``top_n_tokens`` (at most the server's --max-top-n-tokens, 5 by default) the most
likely per position. Prefill values are the raw logits' (temperature 1), the first one null:
teacher forcing is one new token with ``decoder_input_details``.
"""

from __future__ import annotations

from typing import Sequence

from ..replies import NativeRequest, Reply, RequestFailed
from .base import Engine, Sampled


def _token_counts(raw: dict) -> tuple[int, int]:
    details = raw.get("details") or {}
    return len(details.get("prefill") or []), int(details.get("generated_tokens") or 0)


def _details(reply: Reply, key: str) -> list:
    rows = ((reply.raw or {}).get("details") or {}).get(key)
    if not isinstance(rows, list):
        raise RequestFailed(f"the reply has no details.{key} (details, decoder_input_details)", deterministic=True)
    return rows


class Tgi(Engine):
    name = "tgi"
    route = "generate"
    max_top_logprobs = 5
    # /info (router/src/lib.rs, Info): the model, its commit on the Hub, dtype and device, and
    # TGI's own version and commit
    identity_route = "info"
    identity_fields = ("model_id", "model_sha", "model_dtype", "model_device_type", "version", "sha")

    def read_identity(self, raw):
        return self.fields(raw)

    def _inputs(self, ids: Sequence[int]) -> str:
        try:
            return self.chat.token_bytes(ids).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestFailed("the tokens end inside a character, and TGI takes text", certain=True) from None

    def _read_prefill(self, reply: Reply, ids: Sequence[int]) -> list:
        prefill = _details(reply, "prefill")
        if [int(p["id"]) for p in prefill] != list(ids):
            raise RequestFailed(f"TGI read the text as {len(prefill)} other tokens, not the {len(ids)} sent (its "
                                "tokenizer splits it otherwise, or adds a BOS)", certain=True)
        return prefill

    def generation_request(self, prompt, temperature, seed, max_tokens, top_logprobs):
        body = {"inputs": self._inputs(prompt),
                "parameters": {"max_new_tokens": max_tokens, "do_sample": True, "temperature": temperature,
                               "seed": seed, "details": True, "decoder_input_details": True,
                               "top_n_tokens": min(top_logprobs, self.max_top_logprobs) or None,
                               "return_full_text": False}}
        return NativeRequest(self.route, body, len(prompt), max_tokens, _token_counts)

    def read_generation(self, reply: Reply, prompt) -> Sampled:
        self._read_prefill(reply, prompt)
        details = (reply.raw or {}).get("details") or {}
        finish = self.finish(details.get("finish_reason"), ("eos_token",), ("length",))
        tokens = _details(reply, "tokens")
        tops = details.get("top_tokens") or [None] * len(tokens)
        ids = [int(t["id"]) for t in tokens]
        values = self.values([t.get("logprob") for t in tokens], "a generated token")
        listing = [{"token": t, "logprob": v, "top": [[int(e["id"]), e["logprob"]] for e in top or []]}
                   for t, v, top in zip(ids, values, tops)]
        return Sampled(ids, values, finish, listing)

    def teacher_force_request(self, tokens):
        body = {"inputs": self._inputs(tokens),
                "parameters": {"max_new_tokens": 1, "do_sample": False, "details": True,
                               "decoder_input_details": True, "return_full_text": False}}
        return NativeRequest(self.route, body, len(tokens), 1, _token_counts)

    def read_teacher_force(self, reply: Reply, tokens, n_response) -> list[float]:
        prefill = self._read_prefill(reply, tokens)
        return self.values([p.get("logprob") for p in prefill[len(tokens) - n_response:]], "a response token")
