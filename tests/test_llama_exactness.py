"""One numeric path per model: what teacher forcing computes for a token equals what the sampler
used when it drew it, on every weight layout, whatever the batch, slot or sequence count.

Models: SmolLM2's shipped Q4_1, SmolLM2 requantized by llama.cpp's own quantizer to Q4_0,
Q4_K_M, Q5_K_M and Q8_0 (cached under ~/.cache/ope_prep/models), and Gemma 3's Q4_K_M.
The bound is float noise (1e-6 nats per token); measured, the values are equal to the bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, default_config
from llama_reference import WholeSequence
from ope_prep.backends.llama import LlamaModel, log_softmax
from ope_prep.requantize import requantized

SMOL = str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA = str(ROOT / "models" / "gemma-3-270m-q4_k_m.gguf")
GEMMA_TEMPLATE = default_config()["models"]["gemma3_270m"]["chat_template"]
SYSTEM = "You are a helpful assistant."
# Two system prompts sharing a long prefix: their rendered prompts share >= 16 tokens.
LONG_SYSTEM = ("You are a careful, friendly assistant who answers questions about science, "
               "history, cooking and travel in plain words, with examples.")
LONG_SYSTEM_2 = LONG_SYSTEM + " Keep it short."
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.",
           "Explain TCP briefly.", "Name three colors and say why you like them.",
           "How do I boil an egg?", "Give me a tip for learning Spanish.",
           "Say hi.", "Reply with one word: yes or no?"]
EXACT = 1e-6   # nats per token
N_CTX = 640
MAX_TOKENS = 40
QUANTS = ["Q4_1", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0", "gemma_Q4_K_M"]


def model_file(quant: str) -> tuple[str, str | None]:
    if quant == "gemma_Q4_K_M":
        return GEMMA, GEMMA_TEMPLATE
    return (SMOL if quant == "Q4_1" else str(requantized(SMOL, quant))), None


def _load(quant: str, n_seq: int) -> LlamaModel:
    path, template = model_file(quant)
    return LlamaModel(path, n_ctx=N_CTX, n_seq=n_seq, chat_template=template)


def _own_responses(gen: LlamaModel, seed0: int = 50):
    """Each prompt twice (two seeds), 7 sequences per step as stage 2 runs them."""
    jobs = [(gen.chat.prompt_tokens(SYSTEM, p), 0.7, seed0 + i) for i, p in enumerate(PROMPTS * 2)]
    return jobs, gen.generate(jobs, MAX_TOKENS)


@pytest.mark.parametrize("quant", QUANTS)
def test_teacher_forcing_equals_sampling_on_every_quantization(quant):
    gen, tf = _load(quant, 7), _load(quant, 4)
    try:
        jobs, gens = _own_responses(gen)
        # This Gemma 3 270M GGUF continues the prompt instead of answering it and never ended a
        # response by itself in 32 tries (T 0.3-1.5, 64 tokens): its stop case is covered by the
        # SmolLM2 layouts, Q4_K_M and Q5_K_M among them (the same K-quant kernels).
        kinds = {"length"} if quant.startswith("gemma") else {"stop", "length"}
        assert {g.finish_reason for g in gens} == kinds, "need both kinds of response"
        stops = tf.chat.end_of_generation_tokens()
        values = tf.teacher_force_many([(prompt, g.token_ids, temp, stops if g.finish_reason == "stop" else None)
                                        for (prompt, temp, _), g in zip(jobs, gens)])
        worst = max(np.max(np.abs(np.array(v) - np.array(g.token_logprobs))) for v, g in zip(values, gens))
        assert worst <= EXACT, f"{quant}: a token {worst:.3g} nats off"
        assert all(len(v) == len(g.token_ids) for v, g in zip(values, gens))
    finally:
        gen.close()
        tf.close()


@pytest.fixture(scope="module")
def models():
    """Per model: a teacher-forcing instance (4 sequences, as stage 2b) and a generation one (7)."""
    ms = {"smol": (_load("Q4_1", 4), _load("Q4_1", 7)), "gemma": (_load("gemma_Q4_K_M", 4), _load("gemma_Q4_K_M", 7))}
    yield ms
    for pair in ms.values():
        for m in pair:
            m.close()


@pytest.fixture(scope="module")
def responses(models):
    return {key: list(zip(*_own_responses(gen))) for key, (_, gen) in models.items()}


def _items(m: LlamaModel, key: str, responses) -> list[tuple[list[int], list[int], float]]:
    """A 2b-like mix: each response under its own prompt at two temperatures (the second a
    duplicate sequence), and under two long system prompts sharing a prefix; for Gemma also
    a response longer than one batch's logits rows (128)."""
    items = []
    for (prompt, _, _), g in responses[key][:6]:
        items.append((prompt, g.token_ids, 0.7))
        items.append((prompt, g.token_ids, 1.3))
    for i, ((_, _, _), g) in enumerate(responses[key][:3]):
        for system in (LONG_SYSTEM, LONG_SYSTEM_2):
            items.append((m.chat.prompt_tokens(system, PROMPTS[i]), g.token_ids, 0.7))
    long_text = " ".join(f"Step {i}: stir the pot and taste the sauce." for i in range(1, 21))
    items.append((m.chat.prompt_tokens(SYSTEM, "How do I make a tomato sauce?"),
                  m.chat.response_tokens(long_text, stopped=True), 0.9))
    return items


@pytest.mark.parametrize("key", ["smol", "gemma"])
def test_packed_teacher_forcing_equals_llama_cpp_whole_sequence_evaluation(models, responses, key):
    tf, _ = models[key]
    items = _items(tf, key, responses)
    assert len(tf._groups([_seq(p, r) for p, r, _ in items], tf.n_seq, 0)) < len(items)   # prefixes are shared
    assert max(len(r) for _, r, _ in items) > tf.max_outputs or key == "smol"
    batched = tf.teacher_force_many(items)
    ref = WholeSequence(tf.path)
    try:
        for (prompt, response, temp), values in zip(items, batched):
            assert len(values) == len(response)
            assert np.max(np.abs(np.array(values) - ref.logprobs(prompt, response, temp))) <= EXACT
    finally:
        ref.close()
    # One item per call gives the same numbers (packing changes nothing).
    for item, values in list(zip(items, batched))[::3]:
        assert np.max(np.abs(np.array(tf.teacher_force(*item)) - values)) <= EXACT


def _seq(prompt, response):
    from ope_prep.backends.llama.teacher_force import _TFSeq
    return _TFSeq(list(prompt) + list(response), len(prompt))


def test_clone_computed_in_its_own_pass_is_zero_and_a_changed_clone_is_not(models, responses):
    tf, _ = models["smol"]
    (prompt, _, _), g = responses["smol"][1]
    [r_p0] = tf.teacher_force_many([(prompt, g.token_ids, 0.7)])
    clone_prompt = tf.chat.prompt_tokens(SYSTEM, PROMPTS[1])                # rendered on its own
    r_clone, r_hot, r_sys = tf.teacher_force_many([
        (clone_prompt, list(g.token_ids), 0.7),
        (clone_prompt, list(g.token_ids), 0.8),                              # a clone that differs
        (tf.chat.prompt_tokens("You are a terse assistant.", PROMPTS[1]), list(g.token_ids), 0.7)])
    assert abs(sum(r_clone) - sum(r_p0)) <= 1e-9
    assert abs(sum(r_hot) - sum(r_p0)) > 1e-3
    assert abs(sum(r_sys) - sum(r_p0)) > 1e-3


@pytest.mark.parametrize("key", ["smol", "gemma"])
def test_generation_does_not_depend_on_batch_composition(models, key):
    _, gen = models[key]
    prompts = [gen.chat.prompt_tokens(LONG_SYSTEM, p) for p in PROMPTS]
    # 9 jobs on 7 slots (slots refill); p0/pi_clone-like pairs share a whole prompt.
    jobs = [(prompts[i % 6], 0.8, 7 + i) for i in range(9)]
    together = gen.generate(jobs, 20)
    alone = [gen.generate([job], 20)[0] for job in jobs]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.token_logprobs == b.token_logprobs
    assert together[0].token_ids != together[6].token_ids   # same prompt, other seed


def test_generation_steps_of_eight_sequences_match_one_at_a_time():
    gen = _load("gemma_Q4_K_M", 8)
    try:
        jobs = [(gen.chat.prompt_tokens(SYSTEM, PROMPTS[i % 6]), 0.8, 70 + i) for i in range(8)]
        together = gen.generate(jobs, 12)
        for job, a in zip(jobs, together):
            b = gen.generate([job], 12)[0]
            assert a.token_ids == b.token_ids and a.token_logprobs == b.token_logprobs
    finally:
        gen.close()


def test_sampler_is_the_exact_inverse_cdf_of_the_temperature_softmax(models):
    _, gen = models["gemma"]
    rng = np.random.default_rng(0)
    row = (rng.standard_normal(gen.n_vocab) * 4).astype(np.float32)
    row[rng.integers(0, gen.n_vocab, 50)] += 12.0          # a few likely tokens
    for temp in (0.7, 1.3):
        lp = log_softmax(row, temp)
        cdf = np.cumsum(np.exp(lp))
        for u in rng.random(300):
            tok, logprob = gen.sampler.sample(row, temp, float(u))
            expected = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
            if tok != expected:   # only where u falls within float noise of a boundary
                assert abs(cdf[min(tok, expected)] - u * cdf[-1]) < 1e-9
            assert abs(logprob - lp[tok]) < 1e-6


def test_peak_rss_of_a_2b_like_run_with_both_models_loaded(tmp_path):
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from ope_prep.backends.llama import LlamaModel
        from ope_prep.stages.logprobs import TF_SEQUENCES
        ms = [LlamaModel({SMOL!r}, n_ctx=2048, n_seq=TF_SEQUENCES),
              LlamaModel({GEMMA!r}, n_ctx=2048, n_seq=TF_SEQUENCES, chat_template={GEMMA_TEMPLATE!r})]
        text = " ".join("Step %d: stir the pot and taste the sauce." % i for i in range(1, 16))
        for m in ms:
            resp = m.chat.response_tokens(text, stopped=True)
            items = [(m.chat.prompt_tokens(s, "How do I make a tomato sauce? " * k), resp, 0.7)
                     for k in (1, 8, 30) for s in ("You are a helpful assistant.", "Be terse.")]
            assert all(isinstance(v, list) for v in m.teacher_force_many(items))
        # VmHWM: this process's own peak. (ru_maxrss would also count the pytest process it
        # was forked from: Linux carries the peak over exec.)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"maxrss_kb": kb}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rss_gb = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024 ** 2
    assert rss_gb < 1.5, f"peak RSS {rss_gb:.2f} GB"
