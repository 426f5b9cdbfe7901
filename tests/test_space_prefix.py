"""A tokenizer that puts a space before its text (`tokenizer.ggml.add_space_prefix`, as the
SentencePiece GGUFs of Llama 2, Mistral and TinyLlama do): a copy of the Gemma 3 file with that
flag turned on, read through llama.cpp. Its events must be the base response's text exactly, its
prompts what llama.cpp makes of the whole rendered prompt, and an empty event is an error."""

from __future__ import annotations

import shutil
import struct

import pytest

from conftest import ROOT, default_config
from ope_prep.backends.llama import load_tokenizer
from ope_prep.events import Lattice, NoSharedEvent, text_event
from ope_prep.records import Response

SMOL = str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
GEMMA_TEMPLATE = default_config()["models"]["gemma3_270m"]["chat_template"]


def spaced_copy(src, dst) -> None:
    """src with tokenizer.ggml.add_space_prefix set to true (the bool's byte, in place)."""
    shutil.copyfile(src, dst)
    key = b"tokenizer.ggml.add_space_prefix"
    with open(dst, "r+b") as f:
        head = f.read(64 << 20)
        at = head.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
        assert struct.unpack("<I", head[at:at + 4])[0] == 7           # GGUF's bool type
        f.seek(at + 4)
        f.write(b"\x01")


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    path = tmp_path_factory.mktemp("spaced") / "gemma-spaced.gguf"
    spaced_copy(GEMMA, path)
    tokenizers = {"smol": load_tokenizer(SMOL), "spaced": load_tokenizer(str(path), GEMMA_TEMPLATE),
                  "gemma": load_tokenizer(str(GEMMA), GEMMA_TEMPLATE)}
    return tokenizers, {k: t.vocab_digest() for k, t in tokenizers.items()}


def response(ids: list[int], finish: str) -> Response:
    return Response(prompt_id="q", policy="p0", response="", token_ids=ids, token_logprobs=[-1.0] * len(ids),
                    sampling_logprob=-float(len(ids)), n_tokens=len(ids), finish_reason=finish, seed=0)


def test_the_copy_adds_a_space_prefix(toks):
    sp = toks[0]["spaced"]
    assert sp.adds_space_prefix and not toks[0]["gemma"].adds_space_prefix
    raw = sp.model.tokenize(b"Hello", add_bos=False, special=False)
    assert sp.token_bytes(raw) == b" Hello"                  # what llama.cpp makes of a text alone
    assert sp.token_bytes(sp.tokenize_text("Hello")) == b"Hello"


def test_a_stopped_response_is_one_whole_event_under_a_space_prefix_tokenizer(toks):
    """The text event's spelling under a space-prefix tokenizer is the text itself, no space added."""
    tokenizers, vocab = toks
    s, sp = tokenizers["smol"], tokenizers["spaced"]
    ids = s.tokenize_text("Hello there,\n friend.") + [s.end_of_turn]
    ev = text_event(response(ids, "stop"), s)
    assert ev.stops and ev.whole and ev.text == b"Hello there,\n friend."
    assert sp.token_bytes(Lattice(sp).spell(ev.text)) == b"Hello there,\n friend."


@pytest.mark.parametrize("user", ["USER text", "two\nlines here", "inner   spaces, then\n\n  more", "x"])
def test_prompts_are_what_llama_cpp_makes_of_the_whole_rendered_prompt(toks, user):
    """Fragment by fragment, each would get a space of its own (a stray "▁" before the system
    prompt's end, the user text, ...)."""
    for key in ("spaced", "gemma", "smol"):
        t = toks[0][key]
        rendered = t._render([{"role": "system", "content": "SYS"}, {"role": "user", "content": user}], True)
        whole = t.model.tokenize(rendered.encode(), add_bos=False, special=True)
        if t.model.add_bos_token() and whole[:1] != [t.model.token_bos()]:
            whole = [t.model.token_bos()] + whole
        assert t.prompt_tokens("SYS", user) == whole, key


def test_an_event_with_nothing_to_score_is_an_error_not_a_weight_of_one(toks):
    """A response whose first token is a control token and that did not end there has no text to
    score: "it begins with nothing" has probability 1 under every model, so it is an error."""
    tokenizers, vocab = toks
    s = tokenizers["smol"]
    im_start = s.tokenize_template("<|im_start|>")
    assert len(im_start) == 1 and not s.is_text_token(im_start[0])
    with pytest.raises(NoSharedEvent, match="no text before its first control token"):
        text_event(response(im_start + s.tokenize_text("Hello"), "length"), s)
    # A cut after one token is a text event now: "it begins with these bytes".
    ev = text_event(response(s.tokenize_text("Hello"), "length"), s)
    assert ev.text == b"Hello" and not ev.stops and ev.whole
