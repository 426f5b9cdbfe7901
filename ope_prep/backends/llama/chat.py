"""A model's chat template and tokenizer: prompts rendered as at generation, text <-> tokens.

A `ChatTokenizer` needs only the GGUF file's vocabulary, so stage 2b can hold every policy
model's tokenizer at once (`load_tokenizer`, no weights) to decide what text all of them score.

Leading spaces. A SentencePiece vocabulary with `tokenizer.ggml.add_space_prefix` (Llama 2,
Mistral, TinyLlama) puts a space before a text that starts the input or follows a token it
matches by its text (control and user-defined tokens: Gemma's "\n" is one).
Tokenizing each fragment of a prompt on its own would add one before every fragment, and a
response tokenized alone would become " Hello": another text, so no event shared with the base.
Here text that continues text (a response after its prompt, the user text after "\n") is
tokenized without that space, from a second vocabulary loaded with the prefix turned off, and a
prompt comes out as llama.cpp tokenizes the whole rendered prompt.
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import Optional, Sequence

import jinja2.sandbox
import llama_cpp
from llama_cpp import _internals

# Private-use code points: they never occur in the templates, so they mark where the
# system prompt and the user text go, and those parts are tokenized as text.
_SYSTEM_MARK = "\ue000SYSTEM\ue001"
_USER_MARK = "\ue000USER\ue001"
_ASSISTANT_MARK = "\ue000ASSISTANT\ue001"
_MATCHED_BY_TEXT = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                    | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)


class ChatTokenizer:
    def __init__(self, model: _internals.LlamaModel, path: str, chat_template: Optional[str] = None):
        self.model, self.path = model, path
        self.vocab = model.vocab
        self.n_vocab = model.n_vocab()
        template = chat_template or model.metadata().get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{path}: the GGUF file has no chat template; set the model's "
                             "chat_template in the config")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template_text = template
        self.template = env.from_string(template)
        self.bos_text = self.piece_bytes(model.token_bos()).decode("utf-8", "replace")
        self.eos_text = self.piece_bytes(model.token_eos()).decode("utf-8", "replace")
        self._eog: Optional[list[int]] = None
        # Does this vocabulary put a space before a text of its own? Then `_plain` tokenizes text
        # that continues text (the same vocabulary, loaded with the prefix off).
        self._plain = model
        if self.token_bytes(model.tokenize(b"a", add_bos=False, special=False)) == b" a":
            self._plain = load_vocab(path, {"tokenizer.ggml.add_space_prefix": False})
        self.end_of_turn = self._end_of_turn_token()

    # ---- tokens -> bytes -------------------------------------------------------------
    def piece_bytes(self, token: int) -> bytes:
        """The exact bytes of one token, a control token's own text included (<|im_start|>)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:                      # the piece is longer than the buffer: -n bytes needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    def token_bytes(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.piece_bytes(t) for t in tokens)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text for display only: bytes that are not UTF-8 show as U+FFFD (see response_text)."""
        return self.token_bytes(tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def end_of_generation_tokens(self) -> list[int]:
        """Every token generation stops on (llama.cpp's end-of-generation set: Gemma 3's <eos> and
        <end_of_turn>, SmolLM2's <|endoftext|> and <|im_end|>). "The response ended here" is the
        event that one of them comes next, whichever: its probability is the log-sum-exp of
        theirs (see sampling.stop_logprob)."""
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if self.is_end_of_generation(t)]
        return list(self._eog)

    def is_text_token(self, token: int) -> bool:
        """A token that any text can be (not a control token such as <|im_start|>)."""
        return not llama_cpp.llama_vocab_get_attr(self.vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL

    def vocab_digest(self) -> str:
        """Identifies the tokenizer: two models with equal digests tokenize every text alike."""
        h = hashlib.sha256()
        for t in range(self.n_vocab):
            h.update(self.piece_bytes(t) + b"\0" + str(llama_cpp.llama_vocab_get_attr(self.vocab, t)).encode() + b"\0")
        h.update(repr((self.model.token_bos(), self.model.add_bos_token(), self.end_of_turn)).encode())
        h.update(self.model.metadata().get("tokenizer.ggml.model", "").encode())
        h.update(self.model.metadata().get("tokenizer.ggml.pre", "").encode())
        return h.hexdigest()

    # ---- text -> tokens --------------------------------------------------------------
    @property
    def adds_space_prefix(self) -> bool:
        return self._plain is not self.model

    def tokenize_text(self, text: str) -> list[int]:
        """User or model text, as the continuation of text before it (no leading space added):
        special-token strings in it stay text (no template injection)."""
        return self._plain.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def tokenize_template(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _matched_by_text(self, token: int) -> bool:
        """A token llama.cpp's tokenizer matches by its text before splitting the rest into
        pieces (control, user-defined, unknown): the text after it starts a fragment."""
        return bool(llama_cpp.llama_vocab_get_attr(self.vocab, token) & _MATCHED_BY_TEXT)

    def _fragment(self, tokens: list[int], text: str, special: bool) -> list[int]:
        """`text` tokenized after `tokens` as llama.cpp tokenizes a whole prompt: a space prefix
        (if the vocabulary adds one) only at the start or after a token matched by its text."""
        spaced = self.model.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        if not self.adds_space_prefix or not tokens or self._matched_by_text(tokens[-1]):
            return spaced
        # The text up to the first token matched by its text continues the text before it.
        first = next((i for i, t in enumerate(spaced) if self._matched_by_text(t)), len(spaced))
        raw = self.token_bytes(spaced[:first])[1:]           # without the space it was given
        if not text.encode("utf-8").startswith(raw):
            raise ValueError(f"{self.path}: cannot tokenize the template part {text!r} without its space prefix")
        return self._plain.tokenize(raw, add_bos=False, special=False) + spaced[first:]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_text, eos_token=self.eos_text)

    def _end_of_turn_token(self) -> int:
        """The token the chat template puts after an assistant turn (<|im_end|>, <end_of_turn>)."""
        text = self._render([{"role": "user", "content": "x"},
                             {"role": "assistant", "content": _ASSISTANT_MARK}], False)
        tail = self.tokenize_template(text.split(_ASSISTANT_MARK, 1)[1])
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
        tokens: list[int] = []
        for part, special in ((head, True), (system_prompt, False), (middle, True), (user_text, False),
                              (tail, True)):
            tokens += self._fragment(tokens, part, special)
        if self.model.add_bos_token() and (not tokens or tokens[0] != self.model.token_bos()):
            tokens = [self.model.token_bos()] + tokens
        return tokens

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """Any conversation rendered for the assistant's next turn (a judge's prompt): template
        parts may hold special tokens, every message's content is tokenized as plain text, so
        quoted text that spells <|im_end|> cannot end its turn."""
        marks = [f"\ue000MSG{i}\ue001" for i in range(len(messages))]
        text = self._render([{**m, "content": mark} for m, mark in zip(messages, marks)], True)
        tokens: list[int] = []
        for mark, message in zip(marks, messages):
            if text.count(mark) != 1:
                raise ValueError(f"{self.path}: the chat template does not place each message exactly once")
            head, text = text.split(mark)
            tokens += self._fragment(tokens, head, True)
            tokens += self._fragment(tokens, message["content"], False)
        tokens += self._fragment(tokens, text, True)
        if self.model.add_bos_token() and (not tokens or tokens[0] != self.model.token_bos()):
            tokens = [self.model.token_bos()] + tokens
        return tokens

    def digit_tokens(self) -> dict[int, list[int]]:
        """Each digit 0-9 -> the vocabulary's tokens that spell it alone, with or without one
        leading space ("7", " 7"): the answer tokens of a one-digit rating."""
        found: dict[int, list[int]] = {d: [] for d in range(10)}
        for tok in range(self.n_vocab):
            piece = self.piece_bytes(tok)
            if len(piece) <= 2 and self.is_text_token(tok):
                t = piece[1:] if piece[:1] == b" " else piece
                if len(t) == 1 and t.isdigit():
                    found[int(t)].append(tok)
        return found

    def response_tokens(self, text: str, stopped: bool) -> list[int]:
        """Another model's response text in this model's tokens, with this model's end-of-turn
        token when the response ended by itself. The round trip must give the text back."""
        tokens = self.tokenize_text(text)
        if self.token_bytes(tokens) != text.encode("utf-8"):
            raise ValueError("response text does not survive this model's tokenizer round trip")
        return tokens + [self.end_of_turn] if stopped else tokens


def response_text(tokenizer: ChatTokenizer, token_ids: Sequence[int]) -> tuple[str, Optional[str]]:
    """The text of sampled tokens, exactly their bytes: (text, None) when they are UTF-8;
    otherwise (text with U+FFFD for each undecodable byte run, the exact bytes in hex).
    Control tokens sampled mid-response are kept as their own text (<|im_start|>)."""
    raw = tokenizer.token_bytes(token_ids)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), raw.hex()


def load_vocab(path: str, overrides: Optional[dict[str, bool]] = None) -> _internals.LlamaModel:
    """A GGUF file's vocabulary and metadata only, without the weights; `overrides` replace
    boolean metadata keys as the file is read."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    if overrides:
        kv = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()   # the last one ends the list
        for entry, (key, value) in zip(kv, overrides.items()):
            entry.key = key.encode("utf-8")
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            entry.value.val_bool = value
        params.kv_overrides = kv
    model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    if overrides:
        model._kv_overrides = kv         # read while loading; kept alive with the model anyway
    return model


def load_tokenizer(path: str, chat_template: Optional[str] = None) -> ChatTokenizer:
    """A model's tokenizer and template from its GGUF file, without loading the weights."""
    return ChatTokenizer(load_vocab(path), str(path), chat_template)
