"""What a policy with another tokenizer scores of the base response (its text), the lattice of
a tokenizer's spellings of a text, and the text of the tokens: with the real SmolLM2 and Gemma 3
tokenizers (vocabularies only, no weights)."""

from __future__ import annotations

import pytest

from conftest import ROOT, default_config
from ope_prep.backends.llama import load_tokenizer, response_text
from ope_prep.events import Lattice, cross_tokenizer_models, text_event, tokens_event
from ope_prep.records import Response

SMOL = str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA = str(ROOT / "models" / "gemma-3-270m-q4_k_m.gguf")
GEMMA_TEMPLATE = default_config()["models"]["gemma3_270m"]["chat_template"]


@pytest.fixture(scope="module")
def toks():
    s, g = load_tokenizer(SMOL), load_tokenizer(GEMMA, GEMMA_TEMPLATE)
    tokenizers = {"smol": s, "smol_too": load_tokenizer(SMOL), "gemma": g}
    vocab = {k: t.vocab_digest() for k, t in tokenizers.items()}
    assert vocab["smol"] == vocab["smol_too"] != vocab["gemma"]
    assert cross_tokenizer_models("smol", vocab) == {"gemma"}
    return tokenizers, vocab


@pytest.fixture(scope="module")
def lattices(toks):
    return {k: Lattice(toks[0][k]) for k in ("smol", "gemma")}


def response(ids: list[int], finish: str) -> Response:
    return Response(prompt_id="q", policy="p0", response="", token_ids=ids, token_logprobs=[-1.0] * len(ids),
                    sampling_logprob=-float(len(ids)), n_tokens=len(ids), finish_reason=finish, seed=0)


def test_a_cut_response_is_the_event_that_it_begins_with_all_its_bytes(toks, lattices):
    """Cut at max_tokens inside what is one Gemma token ("unbelie" | "vable"): the event is "the
    response begins with these bytes", the whole text, and Gemma's " unbelievable" crosses its end."""
    s, g = toks[0]["smol"], toks[0]["gemma"]
    ids = s.tokenize_text("That is unbelievable")
    assert [s.piece_bytes(t) for t in ids[-2:]] == [b" unbelie", b"vable"]
    ev = text_event(response(ids[:-1], "length"), s)
    assert ev.text == b"That is unbelie" and not ev.stops and ev.whole and ev.sampled == ids[:-1]
    at = len(b"That is")
    crossing = lattices["gemma"].crossing(ev.text, at)
    assert g.tokenize_text(" unbelievable") == [t for t in crossing if g.piece_bytes(t) == b" unbelievable"]
    assert all(g.piece_bytes(t).startswith(b" unbelie") and len(g.piece_bytes(t)) > len(b" unbelie")
               for t in crossing)


def test_a_word_sampled_in_pieces_is_among_the_lattices_spellings(toks, lattices):
    """SmolLM2 sampled "ma"+"ind" where its tokenizer says "main"+"d": both spell the text, and
    the lattice lists every token that continues it at each byte."""
    s = toks[0]["smol"]
    lat = lattices["smol"]
    text = b" maind"
    canonical = lat.spell(text)
    assert [s.piece_bytes(t) for t in canonical] == [b" main", b"d"]
    inside = {s.piece_bytes(t) for t in lat.inside(text, 0)}
    assert {b" ", b" m", b" ma", b" main"} <= inside and all(text.startswith(p) for p in inside)
    assert {s.piece_bytes(t) for t in lat.inside(text, 3)} >= {b"ind", b"i"}


def test_a_stopped_response_is_its_whole_text_then_the_stop(toks):
    s = toks[0]["smol"]
    ids = s.tokenize_text("That is unbelievable") + [s.end_of_turn]
    ev = text_event(response(ids, "stop"), s)
    assert ev.stops and ev.whole and ev.text == b"That is unbelievable" and ev.sampled == ids[:-1]
    # Under the base's own tokenizer: the sampled ids, whole, with the stop.
    assert tokens_event(response(ids, "stop"), s) == (ids, len(b"That is unbelievable"))


def test_bytes_that_are_not_utf8_are_spelled_by_byte_tokens(toks, lattices):
    """A character cut at max_tokens ("é" is two bytes; the response ends after the first): the
    text is its exact bytes, and each tokenizer spells them, the last byte by a byte token."""
    s, g = toks[0]["smol"], toks[0]["gemma"]
    raw = "café".encode()[:-1]
    byte = lattices["smol"].by_piece[raw[-1:]]
    ids = s.tokenize_text("caf") + byte[:1]
    text, raw_hex = response_text(s, ids)
    assert raw_hex == raw.hex() and text == "caf\ufffd"
    ev = text_event(response(ids, "length"), s)
    assert ev.text == raw
    for k in ("smol", "gemma"):
        assert toks[0][k].token_bytes(lattices[k].spell(ev.text)) == raw, k


def test_a_control_token_mid_response_ends_the_text_event(toks):
    tokenizers, _ = toks
    s = tokenizers["smol"]
    im_start = s.tokenize_template("<|im_start|>")[0]
    assert not s.is_text_token(im_start)
    ids = s.tokenize_text("Sure thing.") + [im_start] + s.tokenize_text("user") + [s.end_of_turn]
    text, raw_hex = response_text(s, ids[:-1])
    assert text == "Sure thing.<|im_start|>user" and raw_hex is None             # not dropped
    ev = text_event(response(ids, "stop"), s)
    # Under Gemma "<|im_start|>" would only be text, another event: the text up to before it, no stop.
    assert ev.text == b"Sure thing." and not ev.stops and not ev.whole


def test_pieces_longer_than_the_buffer_are_read_whole(toks):
    s = toks[0]["smol"]
    longest = max(range(s.n_vocab), key=lambda t: len(s.piece_bytes(t)))
    piece = s.piece_bytes(longest)
    assert len(piece) > 64                                  # the first buffer's size
    assert s.tokenize_text(piece.decode()) == [longest]
