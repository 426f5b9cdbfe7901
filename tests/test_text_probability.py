"""A text's probability under a model is the sum over the token sequences that spell it (issue 37,
item 2): on the real SmolLM2 and Gemma 3 models, the beam's figure against every spelling of a
short text with an odd word, each teacher-forced on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import ROOT, default_config
from ope_prep.backends.llama import LlamaModel
from ope_prep.events import Lattice, TextEvent, lse
from ope_prep.text_probability import TextSearch, score_texts

SMOL = str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA = str(ROOT / "models" / "gemma-3-270m-q4_k_m.gguf")
GEMMA_TEMPLATE = default_config()["models"]["gemma3_270m"]["chat_template"]
SYSTEM = "You are a helpful assistant."
USER = "Invent a word and use it."
TEXT = b" maind"          # SmolLM2 samples "ma"+"ind"; its tokenizer says "main"+"d"


@pytest.fixture(scope="module", params=["smol", "gemma"])
def model(request):
    m = (LlamaModel(SMOL, n_ctx=256, n_seq=4) if request.param == "smol"
         else LlamaModel(GEMMA, n_ctx=256, n_seq=4, chat_template=GEMMA_TEMPLATE))
    yield m
    m.close()


def spellings(lat: Lattice, text: bytes) -> list[list[int]]:
    """Every token sequence whose bytes are `text` (a short one)."""
    out: list[list[int]] = []

    def walk(o: int, acc: list[int]) -> None:
        if o == len(text):
            out.append(list(acc))
            return
        for t in lat.inside(text, o):
            walk(o + lat.length(t), acc + [t])
    walk(0, [])
    return out


def test_the_texts_probability_holds_every_spelling_the_test_can_list(model):
    lat = Lattice(model.chat)
    prompt = model.chat.prompt_tokens(SYSTEM, USER)
    stops = model.chat.end_of_generation_tokens()
    every = spellings(lat, TEXT)
    assert len(every) >= 8 and lat.spell(TEXT) in every
    # Each spelling teacher-forced on its own, then the stop: "the response is this text, and ends".
    values = [math.fsum(v) for v in model.teacher_force_many([(prompt, s + [stops[0]], 0.7, stops) for s in every])]
    split = next(i for i, s in enumerate(every) if [model.chat.piece_bytes(t) for t in s][-1:] == [b"ind"])

    event = TextEvent(TEXT, True, every[split], True)
    wide = score_texts(model, [(prompt, 0.7, TextSearch(lat, event, stops, [every[split], lat.spell(TEXT)],
                                                        len(every), 1e-9))])[0]
    # At least the probability of each spelling, and no more than all of them together.
    assert all(wide.logprob >= v for v in values)
    assert wide.logprob <= lse(values) + 1e-9
    assert wide.logprob >= lse(values) - 1e-3          # a beam as wide as the list finds (nearly) all
    # Each path's value is that spelling's teacher-forced value: the same numeric path, to the bit.
    by_tokens = {tuple(s): v for s, v in zip(every, values)}
    for path, value in zip(wide.paths, wide.path_logprobs):
        assert value == pytest.approx(by_tokens[tuple(path)], abs=1e-9)

    # The default's narrow beam: its seeds always, never more than the width.
    narrow = score_texts(model, [(prompt, 0.7, TextSearch(lat, event, stops, [every[split], lat.spell(TEXT)],
                                                          3, 1e-3))])[0]
    assert len(narrow.paths) <= 3 and every[split] in narrow.paths and lat.spell(TEXT) in narrow.paths
    assert lse(narrow.seed_logprobs) - 1e-9 <= narrow.logprob <= wide.logprob + 1e-9
    assert 0.0 <= narrow.dropped_bound <= 1.0


def test_a_prefix_event_counts_the_tokens_that_cross_its_end(model):
    """"The response begins with ' mai'": spellings of ' mai' and every spelling that crosses its
    end (' main', ...) count; the beam's figure is at least the canonical spelling's and the
    crossing mass is part of it."""
    lat = Lattice(model.chat)
    prompt = model.chat.prompt_tokens(SYSTEM, USER)
    text = b" mai"
    event = TextEvent(text, False, lat.spell(text), True)
    res = score_texts(model, [(prompt, 0.7, TextSearch(lat, event, model.chat.end_of_generation_tokens(),
                                                       [lat.spell(text)], 8, 1e-6))])[0]
    canon = math.fsum(model.teacher_force(prompt, lat.spell(text), 0.7))
    assert res.logprob >= canon and res.crossing_logprob is not None
    # The crossing tokens after the empty prefix alone ("main", "maid", ...) are read from one row.
    row_cands = lat.crossing(text, 0)
    assert row_cands and all(model.chat.piece_bytes(t).startswith(text) for t in row_cands)
    assert res.logprob == pytest.approx(float(np.logaddexp.reduce(res.path_logprobs + [res.crossing_logprob])),
                                        abs=1e-12)
