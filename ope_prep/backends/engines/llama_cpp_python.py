"""llama-cpp-python's server (``python -m llama_cpp.server``), through the OpenAI completions API.

The prompt is sent as text (its leading BOS text left out when the server adds BOS itself), and
``usage.prompt_tokens`` must equal our count; a response's tokens are its text's tokens under the
local tokenizer, which must spell exactly the returned tokens. Teacher forcing is ``echo`` with
``logprobs`` and ``max_tokens`` 1 (0 means "until the context is full"): the echoed listing leaves
out BOS tokens, its first value is null, and the one extra token it generates is absent when it is
end-of-text (``usage.completion_tokens`` says), so values are located from the end and every token
of the response is checked by its text.

llama-cpp-python 0.3's echo is misaligned for a prompt that does not start with the model's BOS
token (each token gets the value read from the logits after it): such a request is refused from
the prompt alone (when the generated token is end-of-text the reply looks right). Its values are
computed from the raw logits, whatever the temperature.
"""

from __future__ import annotations

from typing import Sequence

from ..replies import Reply, RequestFailed
from .base import Engine, Sampled

# Sampling parameters that leave softmax(logits / T) alone (llama.cpp's defaults would not).
NEUTRAL = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
           "presence_penalty": 0.0, "frequency_penalty": 0.0}


class LlamaCppPython(Engine):
    name = "llama_cpp_python"
    no_temperature = "llama-cpp-python's server returns log-probabilities of the raw logits (temperature 1)"

    def __init__(self, chat, served_model):
        super().__init__(chat, served_model)
        self._bos = chat.model.token_bos()
        self._adds_bos = chat.model.add_bos_token()

    def _prompt(self, ids: Sequence[int]) -> str:
        if self._adds_bos and ids and ids[0] == self._bos:
            ids = ids[1:]                      # the server puts BOS in front itself
        return self.chat.token_bytes(ids).decode("utf-8")

    def generation_request(self, prompt, temperature, seed, max_tokens, top_logprobs):
        return {"model": self.served_model, "prompt": self._prompt(prompt), "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed, "logprobs": top_logprobs, **NEUTRAL}

    def read_generation(self, reply: Reply, prompt) -> Sampled:
        self.check_prompt_count(reply.prompt_tokens, prompt)
        finish = self.finish(reply.finish_reason, ("stop",), ("length",))
        listing = reply.logprobs or []
        tokens = [e["token"] for e in listing]
        ids = self.chat.tokenize_text(reply.content or "")
        if self._pieces(ids) != tokens:
            raise RequestFailed(
                f"the returned tokens ({len(tokens)}) are not the local tokenizer's tokens of the text "
                f"({len(ids)}): a non-canonical tokenization or a character cut in two", deterministic=True)
        return Sampled(ids, self.values([e["logprob"] for e in listing], "a generated token"), finish, listing)

    def _pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.chat.piece_bytes(t).decode("utf-8", "ignore") for t in ids]

    def teacher_force_request(self, tokens):
        return {"model": self.served_model, "prompt": self._prompt(tokens), "max_tokens": 1,
                "temperature": 1.0, "echo": True, "logprobs": 1, **NEUTRAL}

    def read_teacher_force(self, reply: Reply, tokens, n_response) -> list[float]:
        listing = reply.logprobs or []
        extra = reply.completion_tokens          # the generated token, absent when it was end-of-text
        tokens = list(tokens)
        response = tokens[len(tokens) - n_response:]
        if self._bos in response:
            raise RequestFailed("the response holds the BOS token, which the echo listing leaves out",
                                certain=True)
        if tokens[0] != self._bos:
            # llama-cpp-python 0.3 pairs the listed tokens with the logits rows from the first one on
            # once no BOS was cut from the front: each token gets the value read from the logits
            # *after* it. When the generated token is end-of-text, nothing in the reply shows it (the
            # count is right), so the prompt alone decides.
            raise RequestFailed("the echo is misaligned: its values are read one position late (llama-cpp-"
                                "python's echo, for a prompt that does not start with the model's BOS "
                                "token)", certain=True)
        shown = [t for t in tokens[1:] if t != self._bos]
        if len(listing) - extra != len(shown):
            raise RequestFailed(f"the echo lists {len(listing) - extra} tokens, not {len(shown)}: the "
                                "engine tokenized the text otherwise", certain=True)
        part = listing[len(shown) - n_response:len(shown)]
        # llama-cpp-python shows a control token (the end of turn) as ""
        spelled = [e["token"] in (piece, "" if not self.chat.is_text_token(t) else piece)
                   for e, t, piece in zip(part, response, self._pieces(response))]
        if not all(spelled):
            raise RequestFailed(f"the echoed tokens do not spell the response's tokens (token "
                                f"{spelled.index(False)} of {len(response)})", certain=True)
        return self.values([e["logprob"] for e in part], "the echo of a response token")
