"""vLLM, through the OpenAI completions API with vLLM's extensions.

The prompt is sent as token ids; generated tokens come back as ids (``return_tokens_as_token_ids``),
the stop token left out. Teacher forcing reads ``prompt_logprobs`` of the prompt and response sent
together (its first entry is null), with ``max_tokens`` 1 (0 is rejected). Values returned while
sampling are after temperature only when the server runs with ``--logprobs-mode
processed_logprobs`` (vLLM >= 0.10.2; the default is the raw logits'): the engine check, asked at
each policy's temperature, refuses a server that returns the raw ones. Prompt log-probabilities
are the raw logits' (vLLM 0.10-0.11 apply no temperature to them), so a policy at another
temperature is teacher-forced in process. What it serves (the fingerprint) is its ``/v1/models``
entry: ``root`` (the model path or Hub id it was started with), ``parent``, ``max_model_len``.
"""

from __future__ import annotations

from ..replies import Reply, RequestFailed
from .base import Engine, Sampled

NEUTRAL = {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
           "frequency_penalty": 0.0, "return_tokens_as_token_ids": True, "skip_special_tokens": False}


class Vllm(Engine):
    name = "vllm"

    def generation_request(self, prompt, temperature, seed, max_tokens, top_logprobs):
        return {"model": self.served_model, "prompt": list(prompt), "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed, "logprobs": top_logprobs, **NEUTRAL}

    def read_generation(self, reply: Reply, prompt) -> Sampled:
        self.check_prompt_count(reply.prompt_tokens, prompt)
        finish = self.finish(reply.finish_reason, ("stop",), ("length",))
        listing = reply.logprobs or []
        try:
            ids = [int(e["token"].split(":", 1)[1]) for e in listing]
        except (IndexError, ValueError):
            raise RequestFailed("tokens are not 'token_id:N' (return_tokens_as_token_ids)", deterministic=True)
        return Sampled(ids, self.values([e["logprob"] for e in listing], "a generated token"), finish, listing)

    def teacher_force_request(self, tokens):
        return {"model": self.served_model, "prompt": list(tokens), "max_tokens": 1, "temperature": 1.0,
                "prompt_logprobs": 0, **NEUTRAL}     # 0: the prompt token's own log-probability only

    def read_teacher_force(self, reply: Reply, tokens, n_response) -> list[float]:
        rows = reply.prompt_logprobs
        if rows is None or len(rows) != len(tokens):
            raise RequestFailed(f"prompt_logprobs has {len(rows) if rows is not None else 'no'} entries "
                                f"for {len(tokens)} tokens", deterministic=True)
        out = []
        for pos in range(len(tokens) - n_response, len(tokens)):
            row = rows[pos] or {}
            entry = row.get(str(tokens[pos]), row.get(tokens[pos]))
            if entry is None:
                raise RequestFailed(f"prompt_logprobs at position {pos} has no entry for token {tokens[pos]}",
                                    deterministic=True)
            out.append(float(entry["logprob"] if isinstance(entry, dict) else entry))
        return out
