"""llama.cpp's own C++ server (``llama-server``), through its native ``/completion`` route.

The prompt is sent as token ids (no BOS added to ids); ``return_tokens`` gives the sampled ids,
the end-of-generation token included when it was sampled (``stop_type`` "eos"), and ``n_probs``
with ``post_sampling_probs`` gives each token's probability after the sampler chain, which is set
to temperature alone (``samplers``), so the value is softmax(logits / T) at the policy's
temperature (tools/server/server-context.cpp, populate_token_probs). llama-server cannot return
the log-probabilities of prompt tokens (its /v1/completions takes no echo), so teacher forcing
runs in process from the model file (endpoint.teacher_force false); the engine check compares the
two. ``cache_prompt`` is off: a prompt's cells reused from another request could come from other
batch shapes.
"""

from __future__ import annotations

import math

from ..replies import NativeRequest, Reply, RequestFailed
from .base import Engine, Sampled

NEUTRAL = {"samplers": ["temperature"], "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
           "top_n_sigma": -1.0, "xtc_probability": 0.0, "dry_multiplier": 0.0, "mirostat": 0,
           "dynatemp_range": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _token_counts(raw: dict) -> tuple[int, int]:
    return int(raw.get("tokens_evaluated") or 0), int(raw.get("tokens_predicted") or 0)


def _log(prob) -> float:
    if prob is None or not prob > 0:
        raise RequestFailed(f"a generated token has probability {prob!r}", deterministic=True)
    return math.log(float(prob))


class LlamaServer(Engine):
    name = "llama_server"
    route = "completion"
    no_teacher_forcing = ("llama.cpp's llama-server returns no log-probabilities of prompt tokens (its "
                          "/v1/completions takes no echo)")
    # /props (tools/server/server.cpp): the model file, llama.cpp's build, the chat template and
    # the special tokens it names
    identity_route = "props"
    identity_fields = ("model_path", "build_info", "chat_template", "bos_token", "eos_token")

    def read_identity(self, raw):
        return self.fields(raw)

    def generation_request(self, prompt, temperature, seed, max_tokens, top_logprobs):
        body = {"prompt": list(prompt), "n_predict": max_tokens, "temperature": temperature, "seed": seed,
                "n_probs": max(1, top_logprobs), "post_sampling_probs": True, "return_tokens": True,
                "cache_prompt": False, "stream": False, **NEUTRAL}
        return NativeRequest(self.route, body, len(prompt), max_tokens, _token_counts)

    def read_generation(self, reply: Reply, prompt) -> Sampled:
        raw = reply.raw or {}
        self.check_prompt_count(int(raw.get("tokens_evaluated") or 0), prompt)
        finish = self.finish(raw.get("stop_type"), ("eos",), ("limit",))
        ids, probs = raw.get("tokens"), raw.get("completion_probabilities")
        if not isinstance(ids, list) or not isinstance(probs, list) or len(ids) != len(probs):
            raise RequestFailed("the reply has no tokens (return_tokens) or no probabilities for each "
                                "(n_probs)", deterministic=True)
        if [p.get("id") for p in probs] != ids:
            raise RequestFailed("completion_probabilities are not of the returned tokens", deterministic=True)
        listing = [{"token": p["id"], "logprob": _log(p.get("prob")),
                    "top": [[t["id"], math.log(t["prob"])] for t in p.get("top_probs") or [] if t.get("prob")]}
                   for p in probs]
        return Sampled([int(t) for t in ids], [e["logprob"] for e in listing], finish, listing)
