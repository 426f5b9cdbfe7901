"""Exactness of the fast paths: batched teacher forcing, shared prefixes, batched generation.

Every property is pinned against a one-sequence reference computed here from raw logits: the
high-level `Llama` with logits_all, `eval` of the whole sequence (llama.cpp's own evaluation,
in one batch), and log softmax of each row in numpy, in float64.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from llama_cpp import Llama

from conftest import ROOT, default_config
from ope_prep.backends.llama import LlamaModel, log_softmax

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
           "How do I boil an egg?", "Give me a tip for learning Spanish."]
TOL = 1e-3    # nats per token
N_CTX = 640


def _load(path: str, template=None, n_seq: int = 4, repack: bool = True) -> LlamaModel:
    return LlamaModel(path, n_ctx=N_CTX, n_seq=n_seq, chat_template=template, repack_weights=repack)


@pytest.fixture(scope="module")
def models():
    """Per model: the teacher-forcing instance (repacked weights, as stage 2b) and the
    generation instance (none, as stage 2)."""
    ms = {"smol": (_load(SMOL), _load(SMOL, repack=False)),
          "gemma": (_load(GEMMA, GEMMA_TEMPLATE), _load(GEMMA, GEMMA_TEMPLATE, repack=False))}
    yield ms
    for pair in ms.values():
        for m in pair:
            m.close()


@pytest.fixture(scope="module")
def refs():
    """llama.cpp's own whole-sequence evaluation, one per model, default settings."""
    llms = {"smol": Llama(SMOL, n_ctx=N_CTX, logits_all=True, verbose=False, n_threads=2),
            "gemma": Llama(GEMMA, n_ctx=N_CTX, logits_all=True, verbose=False, n_threads=2)}
    yield llms
    for llm in llms.values():
        llm.close()


def reference(llm: Llama, prompt: list[int], response: list[int], temperature: float) -> np.ndarray:
    """Per-token log softmax(logits / T) of response after prompt, one sequence, from raw logits."""
    assert len(prompt) + len(response) <= llm.n_batch   # evaluated in one batch
    llm.reset()
    llm.eval(prompt + response)
    rows = np.asarray(llm.scores[len(prompt) - 1:len(prompt) + len(response) - 1], dtype=np.float64)
    z = rows / temperature
    z -= z.max(axis=1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return lp[np.arange(len(response)), response]


@pytest.fixture(scope="module")
def responses(models):
    """Real sampled responses per model (generation instance), for PROMPTS under SYSTEM."""
    out = {}
    for key, (_, gen) in models.items():
        jobs = [(gen.prompt_tokens(SYSTEM, p), 0.7, 50 + i) for i, p in enumerate(PROMPTS)]
        out[key] = [(job, g) for job, g in zip(jobs, gen.generate(jobs, 40))]
    return out


def _items(m: LlamaModel, key: str, responses) -> list[tuple[list[int], list[int], float]]:
    """A 2b-like mix: each response under its own prompt at two temperatures (the second a
    duplicate sequence), and under two long system prompts sharing a prefix; for Gemma also
    a response longer than one batch's logits rows (128)."""
    items = []
    for (prompt, _, _), g in responses[key]:
        items.append((prompt, g.token_ids, 0.7))
        items.append((prompt, g.token_ids, 1.3))
    for i, ((_, _, _), g) in enumerate(responses[key][:3]):
        for system in (LONG_SYSTEM, LONG_SYSTEM_2):
            items.append((m.prompt_tokens(system, PROMPTS[i]), g.token_ids, 0.7))
    long_text = " ".join(f"Step {i}: stir the pot and taste the sauce." for i in range(1, 21))
    items.append((m.prompt_tokens(SYSTEM, "How do I make a tomato sauce?"),
                  m.response_tokens(long_text, stopped=True), 0.9))
    return items


@pytest.mark.parametrize("key", ["smol", "gemma"])
def test_batched_teacher_forcing_matches_the_one_sequence_reference(models, refs, responses, key):
    tf, _ = models[key]
    items = _items(tf, key, responses)
    assert len(tf._groups([_seq(p, r) for p, r, _ in items])) < len(items)   # prefixes are shared
    assert max(len(r) for _, r, _ in items) > tf.max_outputs or key == "smol"
    batched = tf.teacher_force_many(items)
    for (prompt, response, temp), values in zip(items, batched):
        ref = reference(refs[key], prompt, response, temp)
        assert len(values) == len(response)
        assert np.max(np.abs(np.array(values) - ref)) <= TOL
        assert all(v <= 0 for v in values)
    # One item per call gives the same numbers (packing changes nothing).
    for item, values in list(zip(items, batched))[::3]:
        assert np.max(np.abs(np.array(tf.teacher_force(*item)) - values)) <= TOL


def _seq(prompt, response):
    from ope_prep.backends.llama import _TFSeq
    return _TFSeq(list(prompt) + list(response), len(prompt))


def test_clone_log_weight_is_zero_and_comes_from_its_own_computation(models, refs, responses):
    tf, _ = models["smol"]
    (prompt, _, _), g = responses["smol"][1]
    p0 = (prompt, g.token_ids, 0.7)
    clone = (tf.prompt_tokens(SYSTEM, PROMPTS[1]), list(g.token_ids), 0.7)   # rendered on its own
    hotter = (clone[0], clone[1], 0.8)                                       # a clone that differs
    other_system = (tf.prompt_tokens("You are a terse assistant.", PROMPTS[1]), clone[1], 0.7)
    r_p0, r_clone, r_hot, r_sys = tf.teacher_force_many([p0, clone, hotter, other_system])
    assert abs(sum(r_clone) - sum(r_p0)) <= 1e-4
    # Had the clone's config differed, its value would have: each is computed from its own inputs.
    assert abs(sum(r_hot) - sum(r_p0)) > 1e-3
    assert np.max(np.abs(np.array(r_hot) - reference(refs["smol"], *hotter))) <= TOL
    assert abs(sum(r_sys) - sum(r_p0)) > 1e-3
    assert np.max(np.abs(np.array(r_sys) - reference(refs["smol"], *other_system))) <= TOL


def test_p0_teacher_forced_equals_sampling_logprob(models, responses):
    tf, gen = models["smol"]
    jobs = [(gen.prompt_tokens(SYSTEM, p), 0.7, 900 + i) for i, p in enumerate(PROMPTS + PROMPTS)]
    gens = gen.generate(jobs, 48)
    values = tf.teacher_force_many([(prompt, g.token_ids, temp) for (prompt, temp, _), g in zip(jobs, gens)])
    per_token = [abs(sum(v) - g.logprob) / len(g.token_ids) for v, g in zip(values, gens)]
    assert {g.finish_reason for g in gens} == {"stop", "length"}
    assert np.mean(np.array(per_token) <= TOL) >= 0.99
    assert max(per_token) <= TOL


@pytest.mark.parametrize("key", ["smol", "gemma"])
def test_generation_does_not_depend_on_batch_composition(models, key):
    _, gen = models[key]
    prompts = [gen.prompt_tokens(LONG_SYSTEM, p) for p in PROMPTS]
    # 9 jobs on 4 slots (slots refill); p0/pi_clone-like pairs share a whole prompt.
    jobs = [(prompts[i % 6], 0.8, 7 + i) for i in range(9)]
    together = gen.generate(jobs, 20)
    alone = [gen.generate([job], 20)[0] for job in jobs]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert abs(a.logprob - b.logprob) <= 1e-9
    assert together[0].token_ids != together[6].token_ids   # same prompt, other seed


def test_generation_steps_of_eight_sequences_match_one_at_a_time():
    """With 8 slots a step is split into llama_decode calls of at most 7 tokens: for Gemma a
    batch of 8 tokens would take other kernels than one of 1 (a different distribution)."""
    gen = _load(GEMMA, GEMMA_TEMPLATE, n_seq=8, repack=False)
    try:
        jobs = [(gen.prompt_tokens(SYSTEM, PROMPTS[i % 6]), 0.8, 70 + i) for i in range(8)]
        together = gen.generate(jobs, 12)
        for job, a in zip(jobs, together):
            b = gen.generate([job], 12)[0]
            assert a.token_ids == b.token_ids and abs(a.logprob - b.logprob) <= 1e-9
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
            tok, logprob = gen._sample(row, temp, float(u))
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
            resp = m.response_tokens(text, stopped=True)
            items = [(m.prompt_tokens(s, "How do I make a tomato sauce? " * k), resp, 0.7)
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
