"""What every policy scores of the base response when tokenizers differ, and the text of the
tokens: with the real SmolLM2 and Gemma 3 tokenizers (vocabularies only, no weights)."""

from __future__ import annotations

import pytest

from conftest import ROOT, default_config
from ope_prep.backends.llama import load_tokenizer, response_text
from ope_prep.records import Response
from ope_prep.events import scored_event

SMOL = str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA = str(ROOT / "models" / "gemma-3-270m-q4_k_m.gguf")
GEMMA_TEMPLATE = default_config()["models"]["gemma3_270m"]["chat_template"]


@pytest.fixture(scope="module")
def toks():
    s, g = load_tokenizer(SMOL), load_tokenizer(GEMMA, GEMMA_TEMPLATE)
    tokenizers = {"smol": s, "smol_too": load_tokenizer(SMOL), "gemma": g}
    vocab = {k: t.vocab_digest() for k, t in tokenizers.items()}
    assert vocab["smol"] == vocab["smol_too"] != vocab["gemma"]
    return tokenizers, vocab


def response(ids: list[int], finish: str) -> Response:
    return Response(prompt_id="q", policy="p0", response="", token_ids=ids, token_logprobs=[-1.0] * len(ids),
                    sampling_logprob=-float(len(ids)), n_tokens=len(ids), finish_reason=finish, seed=0)


def test_a_cut_inside_a_target_token_scores_the_prefix_all_tokenizers_share(toks):
    tokenizers, vocab = toks
    s, g = tokenizers["smol"], tokenizers["gemma"]
    ids = s.tokenize_text("That is unbelievable")
    assert [s.piece_bytes(t) for t in ids[-2:]] == [b" unbelie", b"vable"]     # one Gemma token
    assert [g.piece_bytes(t) for t in g.tokenize_text(" unbelievable")] == [b" unbelievable"]
    cut = response(ids[:-1], "length")                                          # "That is unbelie"
    ev = scored_event(cut, "smol", tokenizers, vocab)
    assert not ev.complete and ev.scored_bytes == len(b"That is")
    assert ev.tokens["smol"] == ev.tokens["smol_too"] == ids[:-2]
    assert g.token_bytes(ev.tokens["gemma"]) == b"That is"
    # Re-tokenizing the whole cut text would score " unbel" + "ie"-like pieces under Gemma,
    # an event p0 never produced.
    naive = g.tokenize_text("That is unbelie")
    assert naive[:len(ev.tokens["gemma"])] == ev.tokens["gemma"] and len(naive) > len(ev.tokens["gemma"])


def test_a_cut_at_a_shared_boundary_still_drops_the_last_word(toks):
    """The end of a cut text is no boundary: the next token might have joined the last word."""
    tokenizers, vocab = toks
    s, g = tokenizers["smol"], tokenizers["gemma"]
    ids = s.tokenize_text("The cat sat")
    ev = scored_event(response(ids, "length"), "smol", tokenizers, vocab)
    assert ev.scored_bytes == len(b"The cat") and g.token_bytes(ev.tokens["gemma"]) == b"The cat"


def test_a_stopped_response_is_scored_whole_with_each_models_end_of_turn(toks):
    tokenizers, vocab = toks
    s, g = tokenizers["smol"], tokenizers["gemma"]
    ids = s.tokenize_text("That is unbelievable") + [s.end_of_turn]
    ev = scored_event(response(ids, "stop"), "smol", tokenizers, vocab)
    assert ev.complete and ev.scored_bytes == len(b"That is unbelievable")
    assert ev.tokens["smol"] == ids
    assert ev.tokens["gemma"] == g.tokenize_text("That is unbelievable") + [g.end_of_turn]


def test_same_tokenizer_only_scores_the_sampled_ids_whole(toks):
    tokenizers, vocab = toks
    ids = tokenizers["smol"].tokenize_text("The cat sat")
    only_smol = {k: tokenizers[k] for k in ("smol", "smol_too")}
    ev = scored_event(response(ids, "length"), "smol", only_smol, vocab)
    assert ev.complete and ev.tokens == {"smol": ids, "smol_too": ids}


def test_a_character_cut_at_max_tokens_is_kept_as_bytes_and_not_scored_across_tokenizers(toks):
    tokenizers, vocab = toks
    s = tokenizers["smol"]
    ids = s.tokenize_text("Hello there 🌳 world")
    k = next(i for i in range(len(ids)) if b"\xf0" in s.piece_bytes(ids[i])) + 1   # inside the emoji
    cut = ids[:k]
    text, raw_hex = response_text(s, cut)
    assert raw_hex is not None and bytes.fromhex(raw_hex) == s.token_bytes(cut)    # nothing lost
    assert text.startswith("Hello there") and text.endswith("\ufffd")
    ev = scored_event(response(cut, "length"), "smol", tokenizers, vocab)
    assert not ev.complete and ev.scored_bytes == len(b"Hello there")   # the last boundary before it
    assert tokenizers["gemma"].token_bytes(ev.tokens["gemma"]) == b"Hello there"
    whole, none = response_text(s, ids)
    assert whole == "Hello there 🌳 world" and none is None


def test_a_control_token_mid_response_is_kept_as_text_and_ends_the_shared_event(toks):
    tokenizers, vocab = toks
    s, g = tokenizers["smol"], tokenizers["gemma"]
    im_start = s.tokenize_template("<|im_start|>")[0]
    assert not s.is_text_token(im_start)
    ids = s.tokenize_text("Sure thing.") + [im_start] + s.tokenize_text("user") + [s.end_of_turn]
    text, raw_hex = response_text(s, ids[:-1])
    assert text == "Sure thing.<|im_start|>user" and raw_hex is None             # not dropped
    ev = scored_event(response(ids, "stop"), "smol", tokenizers, vocab)
    # Under Gemma "<|im_start|>" would only be text, another event: score up to before it, no end.
    assert not ev.complete and g.token_bytes(ev.tokens["gemma"]) == b"Sure thing"
    assert ev.scored_bytes == len(b"Sure thing") and s.token_bytes(ev.tokens["smol"]) == b"Sure thing"


def test_pieces_longer_than_the_buffer_are_read_whole(toks):
    s = toks[0]["smol"]
    longest = max(range(s.n_vocab), key=lambda t: len(s.piece_bytes(t)))
    piece = s.piece_bytes(longest)
    assert len(piece) > 64                                  # the first buffer's size
    assert s.tokenize_text(piece.decode()) == [longest]


def test_a_cut_prefix_is_what_each_tokenizer_makes_of_its_text_alone(toks):
    """"code:\n\n```" is ":", "\n", "\n", "```" in SmolLM2, but "code:\n\n" alone ends in one "\n\n"
    token: a prefix ending there would be other tokens to an engine that takes text prompts."""
    tokenizers, vocab = toks
    s = tokenizers["smol"]
    ids = s.tokenize_text("Here is the code:\n\n```")
    assert [s.piece_bytes(t) for t in ids[-4:]] == [b":", b"\n", b"\n", b"```"]
    ev = scored_event(response(ids, "length"), "smol", tokenizers, vocab)
    text = s.token_bytes(ids)[:ev.scored_bytes].decode()
    assert 0 < ev.scored_bytes < len(s.token_bytes(ids))
    for k, t in tokenizers.items():
        assert t.tokenize_text(text) == ev.tokens[k], (k, text)
