"""Which numeric path is closer to the model's own arithmetic: the pipeline's or llama.cpp's default.

    python benchmarks/bench_numeric_accuracy.py [--prompts 8] [--max-tokens 64]

For each quantization (the default's SmolLM2 Q4_1 and its requantizations Q4_0, Q4_K_M, Q5_K_M,
Q8_0; the default's Gemma 3 Q4_K_M), responses are sampled by the pipeline (T 1, one per prompt)
and every response token's log-probability is computed three ways, each in a process of its own
(the tiled-matmul switch is read once per process), each sequence in one batch:

* pipeline: the pipeline's numeric path (backends/llama/engine.py, NUMERIC_SETTINGS: no tiled
  K-quant matmul, no repacked weights, no flash attention; this build has no llamafile sgemm);
* default: llama.cpp's default run-time kernels (tiled K-quant matmul, repacked weights, flash
  attention auto) in this same build;
* reference: the same weights dequantized to F32 by llama.cpp's quantizer (ope_prep.requantize),
  evaluated with F32 weights and an F32 KV cache: the quantized model's arithmetic, with the
  rounding of the kernels' quantized activations and half-precision cache taken out.

Printed per quantization: the per-token |difference| from the reference of each path (max,
mean, 99th percentile), and the largest per-response |difference| of the summed log-probability.
Output is kept in benchmarks/last_numeric_accuracy_run.txt by whoever runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is the capital of France, and what is it known for?",
    "Write a short poem about the sea.",
    "Explain how a bicycle stays upright.",
    "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "List four uses of a paperclip.",
    "What should I pack for a weekend hiking trip?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Describe a cat to someone who has never seen one.",
]
SETTINGS = ("pipeline", "default", "reference")


def evaluate(path: str, sequences_json: str, settings: str, out_json: str) -> None:
    """Per-token log-probabilities of each (prompt, response) in sequences_json under settings,
    written to out_json. Runs in a process of its own."""
    if settings == "default":
        os.environ.pop("GGML_CPU_TILED_MM", None)
    else:
        os.environ["GGML_CPU_TILED_MM"] = "0"
    import llama_cpp
    from llama_cpp import _internals
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = settings == "default"
    model = _internals.LlamaModel(path_model=path, params=mp, verbose=False)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 2048, 512, 512, 2, 2
    cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if settings == "default"
                          else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    if settings == "reference":
        cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
    ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
    n_vocab = model.n_vocab()
    out = []
    for prompt, response in json.loads(Path(sequences_json).read_text()):
        tokens = prompt + response
        llama_cpp.llama_memory_clear(ctx.memory, True)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i >= len(prompt) - 1
            batch.n_tokens = len(tokens)
            if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, len(prompt) - 1 + k),
                                                   shape=(n_vocab,)).astype(np.float64)
                             for k in range(len(response))])
        finally:
            llama_cpp.llama_batch_free(batch)
        lp = rows - np.logaddexp.reduce(rows, axis=1, keepdims=True)
        out.append(lp[np.arange(len(response)), response].tolist())
    Path(out_json).write_text(json.dumps(out))


def sample_responses(path: Path, chat_template, n_prompts: int, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    from ope_prep.backends.llama import LlamaModel
    model = LlamaModel(path, n_ctx=2048, n_seq=4, chat_template=chat_template)
    try:
        prompts = [model.chat.prompt_tokens("You are a helpful assistant.", text) for text in PROMPTS[:n_prompts]]
        gens = model.generate([(p, 1.0, 1000 + i) for i, p in enumerate(prompts)], max_tokens)
    finally:
        model.close()
    return [(p, list(g.token_ids)) for p, g in zip(prompts, gens)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--evaluate", nargs=4, metavar=("MODEL", "SEQUENCES", "SETTINGS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.evaluate:
        evaluate(*args.evaluate)
        return
    from ope_prep.config import load_config
    from ope_prep.requantize import requantized
    config = load_config(ROOT / "config.yaml")      # the embedded default's two models
    smol, gemma = config.model_path("smollm2_135m"), config.model_path("gemma3_270m")
    smol_template, gemma_template = (config.models[k].chat_template for k in ("smollm2_135m", "gemma3_270m"))
    variants = [("SmolLM2 Q4_1", smol, smol_template)] + [
        (f"SmolLM2 {q}", requantized(smol, q), smol_template) for q in ("Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0")] + [
        ("Gemma 3 Q4_K_M", gemma, gemma_template)]
    print(f"{args.prompts} responses per model (T 1, up to {args.max_tokens} tokens); per-token |log p - "
          "reference| in nats: max / mean / p99; and the largest per-response |sum difference|")
    print(f"{'model':16} {'tokens':>6}  {'pipeline: max / mean / p99':>32} {'resp':>8}  "
          f"{'default: max / mean / p99':>32} {'resp':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, chat_template in variants:
            seqs = sample_responses(path, chat_template, args.prompts, args.max_tokens)
            seq_file = Path(tmp) / "sequences.json"
            seq_file.write_text(json.dumps(seqs))
            values = {}
            for settings in SETTINGS:
                model = requantized(path, "F32") if settings == "reference" else path
                out = Path(tmp) / f"{settings}.json"
                proc = subprocess.run([sys.executable, __file__, "--evaluate", str(model), str(seq_file), settings,
                                       str(out)], capture_output=True, text=True)     # llama.cpp's log: kept out
                if proc.returncode:
                    raise RuntimeError(f"{name} {settings}: exit {proc.returncode}: {proc.stderr[-2000:]}")
                values[settings] = json.loads(out.read_text())
            cells = []
            for settings in ("pipeline", "default"):
                per_token = np.concatenate([np.abs(np.subtract(a, r)) for a, r in
                                            zip(values[settings], values["reference"])])
                per_response = max(abs(sum(a) - sum(r)) for a, r in zip(values[settings], values["reference"]))
                cells.append(f"{per_token.max():9.2e} / {per_token.mean():8.2e} / {np.quantile(per_token, 0.99):8.2e} "
                             f"{per_response:8.3f}")
            n_tokens = sum(len(r) for _, r in seqs)
            print(f"{name:16} {n_tokens:6d}  {cells[0]:>41}  {cells[1]:>41}", flush=True)


if __name__ == "__main__":
    main()
