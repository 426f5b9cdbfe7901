"""Stage 2 and 2b speed, measured side by side with the same model, threads and inputs.

    python benchmarks/bench_llama.py [--model smollm2_135m] [--prompts 24] [--rounds 3]

Inputs are built here: real prompts sampled from the configured source (ShareGPT in the
embedded default), rendered with the policy's system prompt, and real responses (this
generator's own, at the policy's temperature, up to --max-tokens).

Pairs of paths, each pair run alternately --rounds times (the order flips every round), and
the medians compared:

* teacher forcing (`LlamaModel.teacher_force_many`, all pairs in one call) against a raw
  replay of the very `llama_decode` calls it made (same token batches, positions, sequence
  ids, logits flags and cache operations; batches built before the clock starts), and against
  the same replay with logits only at each batch's last token (pure prefill);
* teacher forcing against `Llama(logits_all=True).create_completion(prompt + response,
  echo=True, logprobs=1, max_tokens=1)` over the same (prompt, response) pairs (the first
  --echo-pairs of them: that path runs at ~20 tokens/s);
* generation (`LlamaModel.generate`, --batch-size sequences at once) against a raw replay of
  the very `llama_decode` calls it made (its ceiling: the same prompt prefills and steps, the
  same logits rows, nothing sampled), and against `Llama.create_chat_completion` one prompt at
  a time, same prompts, messages, temperature and max_tokens, with top_k=0, top_p=1, min_p=0.

Throughputs: teacher forcing, prefill and echo count prompt + response tokens processed;
generation and chat count generated tokens (completion_tokens), prefill time included.
Also measured, to show where generation's ceiling is: `LlamaModel.generate` one sequence at
a time (what batching gains over a single stream on this machine).

What exactness costs: the pipeline runs llama.cpp with one numeric path (no repacked weights,
no tiled K-quant matmul, see ope_prep/backends/llama/engine.py). For every model of the
config, a prefill of the same (prompt + response) sequences, one per llama_decode call, runs
in two fresh processes per round, alternating: with the pipeline's settings and with
llama.cpp's fastest (its defaults: repacked weights, tiled matmul). Printed per model as
`fastest/ours`, with every round's figure.

The load average is printed at the start (a run that starts above 1.5 is marked NOT IDLE: its
figures are not for the README).

The last line is exactly:
gen_vs_decode=<x> (min <a>, max <b>) tf_vs_prefill=<x> (min, max) tf_vs_echo=<y> gen_vs_chat=<z>
(ratios of median throughputs, with the spread of each round's own ratio for the two ceilings;
gen_vs_decode against the replay of generation's own llama_decode calls; tf_vs_prefill
against the pure-prefill replay of the same token batches, the stricter of the two replays,
with the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama_cpp  # noqa: E402
from bench_scoring import idle_verdict  # noqa: E402
from llama_cpp import Llama  # noqa: E402

from ope_prep.backends.llama import LlamaModel, load_tokenizer  # noqa: E402
from ope_prep.config import load_config  # noqa: E402
from ope_prep.sources.mix import sample_prompts  # noqa: E402
from ope_prep.stages.logprobs import TF_SEQUENCES  # noqa: E402



def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--model", default=None, help="a key of models (default: the base policy's)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=None, help="default: generation.max_tokens")
    ap.add_argument("--batch-size", type=int, default=None, help="default: generation.batch_size")
    ap.add_argument("--echo-pairs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prefill-only", nargs=3, metavar=("MODEL_PATH", "SEQUENCES_JSON", "SETTINGS"),
                    help=argparse.SUPPRESS)   # internal: one process of the numeric-path cost rounds
    return ap.parse_args()


class Replay:
    """Records the llama_decode calls and cache operations of a LlamaModel run (its `trace`
    hook), then replays them through llama.cpp directly, with every batch built beforehand."""

    def __init__(self, model: LlamaModel):
        self.model, self.ops = model, []

    def __enter__(self):
        self.model.trace = self.ops.append
        return self

    def __exit__(self, *exc):
        self.model.trace = None

    def build(self, logits: str) -> list:
        """logits: "same" (as recorded) or "last" (only each batch's last token: prefill)."""
        built = []
        for op in self.ops:
            if op[0] != "decode":
                built.append(op)
                continue
            entries = op[1]
            b = llama_cpp.llama_batch_init(len(entries), 0, 1)
            for i, (tok, pos, seq, want) in enumerate(entries):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                b.seq_id[i][0] = seq if isinstance(seq, int) else seq[0]
                b.logits[i] = want if logits == "same" else i == len(entries) - 1
            b.n_tokens = len(entries)
            built.append(("decode", b))
        return built

    def run(self, built: list) -> float:
        ctx, mem = self.model.ctx.ctx, self.model.ctx.memory
        t = time.perf_counter()
        for op in built:
            if op[0] == "decode":
                if llama_cpp.llama_decode(ctx, op[1]) != 0:
                    raise RuntimeError("llama_decode failed")
            elif op[0] == "clear":
                llama_cpp.llama_memory_seq_rm(mem, op[1], -1, -1)
            elif op[0] == "trim":
                llama_cpp.llama_memory_seq_rm(mem, op[1], op[2], -1)
            else:
                llama_cpp.llama_memory_seq_cp(mem, op[1], op[2], -1, -1)
                llama_cpp.llama_memory_seq_rm(mem, op[2], op[3], -1)
        return time.perf_counter() - t

    @staticmethod
    def free(built: list) -> None:
        for op in built:
            if op[0] == "decode":
                llama_cpp.llama_batch_free(op[1])


def alternate(rounds: int, *fns) -> list[list[float]]:
    """Run the fns (each returns a throughput) in turn, `rounds` times, the order rotating
    every round; the throughputs per fn."""
    out: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns)))
        order = order[r % len(fns):] + order[:r % len(fns)]
        for i in order:
            out[i].append(fns[i]())
    return out


def prefill_only(path: str, sequences_json: str, settings: str) -> None:
    """One round of the numeric-path cost, in a process of its own (the tiled-matmul switch is
    read once per process): prints tokens/s of a prefill of each sequence."""
    if settings == "fastest":
        os.environ.pop("GGML_CPU_TILED_MM", None)
    else:
        os.environ["GGML_CPU_TILED_MM"] = "0"
    from llama_cpp import _internals
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = settings == "fastest"
    model = _internals.LlamaModel(path_model=path, params=mp, verbose=False)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 2048, 512, 512, 2, 2
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
    sequences = [s[:512] for s in json.loads(Path(sequences_json).read_text())]
    batches = []
    for seq in sequences:
        b = llama_cpp.llama_batch_init(len(seq), 0, 1)
        for i, tok in enumerate(seq):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, i == len(seq) - 1
            b.seq_id[i][0] = 0
        b.n_tokens = len(seq)
        batches.append(b)
    t = time.perf_counter()
    for b in batches:
        llama_cpp.llama_memory_clear(ctx.memory, True)
        if llama_cpp.llama_decode(ctx.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
    print(sum(map(len, sequences)) / (time.perf_counter() - t))


def numeric_path_cost(config, base_tok, sequences: list[list[int]], rounds: int
                      ) -> list[tuple[str, list[float], list[float]]]:
    """Per model of the config: prefill tokens/s with the pipeline's settings and with
    llama.cpp's fastest, one fresh process per measurement, alternating."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in dict.fromkeys(p.model for p in config.policies):
            # The same texts in this model's tokens (prompt + response).
            tok = load_tokenizer(str(config.model_path(key)), config.models[key].chat_template)
            seqs = [tok.tokenize_text(base_tok.detokenize(s))[:512] for s in sequences]
            path = Path(tmp) / f"{key}.json"
            path.write_text(json.dumps(seqs))

            def one(settings: str) -> float:
                proc = subprocess.run([sys.executable, __file__, "--prefill-only", str(config.model_path(key)),
                                       str(path), settings], capture_output=True, text=True, check=True)
                return float(proc.stdout.strip().splitlines()[-1])

            ours, fastest = alternate(rounds, lambda: one("ours"), lambda: one("fastest"))
            out.append((key, ours, fastest))
    return out


def main() -> None:
    args = parse_args()
    if args.prefill_only:
        prefill_only(*args.prefill_only)
        return
    start_load = os.getloadavg()[0]           # before this benchmark adds its own
    config = load_config(args.config)
    model_key = args.model or config.policy(config.base_policy).model
    policy = next(p for p in config.policies if p.model == model_key)
    mcfg = config.models[model_key]
    path = str(config.model_path(model_key))
    threads = config.generation.n_threads
    max_tokens = args.max_tokens or config.generation.max_tokens
    batch_size = args.batch_size or config.generation.batch_size
    system, temp = policy.system_prompt, policy.temperature
    t_start = time.perf_counter()

    gen = LlamaModel(path, n_ctx=mcfg.n_ctx, n_seq=batch_size, n_threads=threads,
                     chat_template=mcfg.chat_template)                            # as stage 2
    single = LlamaModel(path, n_ctx=mcfg.n_ctx, n_seq=1, n_threads=threads, chat_template=mcfg.chat_template)
    tf = LlamaModel(path, n_ctx=mcfg.n_ctx, n_seq=TF_SEQUENCES, n_threads=threads,
                    chat_template=mcfg.chat_template)                             # as stage 2b
    chat = Llama(path, n_ctx=mcfg.n_ctx, n_threads=threads, verbose=False, chat_format=None)
    chat_handler = None
    if mcfg.chat_template:   # the GGUF has none: give the high-level call the same template
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        chat_handler = Jinja2ChatFormatter(mcfg.chat_template, eos_token=gen.chat.eos_text,
                                           bos_token=gen.chat.bos_text).to_chat_handler()
        chat.chat_handler = chat_handler

    prompts = []
    # the default mix's "chat" group (ShareGPT): the kind of prompt the figures below were measured on
    only = ["chat"] if any(s.group_name == "chat" for s in config.source.mix) else []
    for p in sample_prompts(config, args.prompts * 3, args.seed, only=only).prompts:
        if len(gen.chat.prompt_tokens(system, p.prompt)) + max_tokens <= min(mcfg.n_ctx, 512):
            prompts.append(p.prompt)   # the echo reference evaluates a pair in one batch
        if len(prompts) == args.prompts:
            break
    jobs = [(gen.chat.prompt_tokens(system, p), temp, 1000 + i) for i, p in enumerate(prompts)]
    messages = [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in prompts]
    print(f"model {model_key} ({Path(path).name}), {threads} threads, {len(prompts)} ShareGPT prompts, "
          f"max_tokens {max_tokens}, temperature {temp}, generation batch {batch_size}, "
          f"teacher-forcing sequences {TF_SEQUENCES}; load average at start: {start_load:.2f}", flush=True)

    # ---- generation vs create_chat_completion -----------------------------------------
    responses = {}

    def run_gen():
        t = time.perf_counter()
        gens = gen.generate(jobs, max_tokens)
        dt = time.perf_counter() - t
        responses.setdefault("pairs", [(job[0], g.token_ids) for job, g in zip(jobs, gens)])
        return sum(len(g.token_ids) for g in gens) / dt

    def run_chat():
        n, t = 0, time.perf_counter()
        for i, msgs in enumerate(messages):
            out = chat.create_chat_completion(messages=msgs, max_tokens=max_tokens, temperature=temp,
                                              top_k=0, top_p=1.0, min_p=0.0, seed=1000 + i)
            n += out["usage"]["completion_tokens"]
        return n / (time.perf_counter() - t)

    def run_single():
        t = time.perf_counter()
        gens = single.generate(jobs, max_tokens)
        return sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t)

    with Replay(gen) as gen_rec:             # generation's own llama_decode calls, to replay raw
        run_gen()
    gen_built = gen_rec.build("same")
    n_generated = sum(len(r) for _, r in responses["pairs"])

    gen_tps, decode_tps, chat_tps, single_tps = alternate(
        args.rounds, run_gen, lambda: n_generated / gen_rec.run(gen_built), run_chat, run_single)
    Replay.free(gen_built)
    single.close()
    print(f"  generation: ours {[round(x) for x in gen_tps]}, raw replay of its llama_decode calls "
          f"{[round(x) for x in decode_tps]}, chat {[round(x) for x in chat_tps]}, "
          f"ours one sequence at a time {[round(x) for x in single_tps]} tokens/s", flush=True)

    # ---- teacher forcing vs the raw replay of its llama_decode calls ------------------
    pairs = responses["pairs"]
    items = [(prompt, resp, temp) for prompt, resp in pairs]
    n_tokens = sum(len(p) + len(r) for p, r in pairs)
    with Replay(tf) as rec:
        tf.teacher_force_many(items)
    same, last = rec.build("same"), rec.build("last")
    n_calls = sum(op[0] == "decode" for op in rec.ops)

    def run_tf(sub=items, n=n_tokens):
        t = time.perf_counter()
        tf.teacher_force_many(sub)
        return n / (time.perf_counter() - t)

    tf_tps, raw_tps, prefill_tps = alternate(args.rounds, run_tf, lambda: n_tokens / rec.run(same),
                                             lambda: n_tokens / rec.run(last))
    Replay.free(same)
    Replay.free(last)
    print(f"  teacher forcing: ours {[round(x) for x in tf_tps]}, same batches raw {[round(x) for x in raw_tps]}, "
          f"raw prefill {[round(x) for x in prefill_tps]} tokens/s ({n_tokens} tokens, {n_calls} llama_decode calls)",
          flush=True)

    # ---- teacher forcing vs create_completion(echo=True, logprobs=1) ------------------
    echo = Llama(path, n_ctx=mcfg.n_ctx, n_threads=threads, logits_all=True, verbose=False)
    sub_pairs = pairs[:args.echo_pairs]
    sub_items = items[:args.echo_pairs]
    sub_tokens = sum(len(p) + len(r) for p, r in sub_pairs)
    # A token-list prompt with echo=True fails in llama-cpp-python 0.3.36 (it concatenates the
    # list to the text), so the echo path gets the text that tokenizes back to those tokens.
    texts = [echo.detokenize(p + r, special=True).decode("utf-8", errors="replace") for p, r in sub_pairs]
    round_trip = sum(echo.tokenize(t.encode(), add_bos=False, special=True) == p + r
                     for t, (p, r) in zip(texts, sub_pairs))

    def run_echo():
        n, t = 0, time.perf_counter()
        for text in texts:
            out = echo.create_completion(prompt=text, echo=True, logprobs=1, max_tokens=1, temperature=temp,
                                         top_k=0, top_p=1.0, min_p=0.0)
            n += out["usage"]["prompt_tokens"]
        return n / (time.perf_counter() - t)

    tf_sub_tps, echo_tps = alternate(args.rounds, lambda: run_tf(sub_items, sub_tokens), run_echo)
    echo.close()
    print(f"  teacher forcing (first {len(sub_pairs)} pairs, {sub_tokens} tokens, {round_trip} exact text "
          f"round trips): ours {[round(x) for x in tf_sub_tps]}, echo {[round(x) for x in echo_tps]} tokens/s",
          flush=True)

    # ---- what the one numeric path costs against llama.cpp's fastest settings ---------
    costs = numeric_path_cost(config, gen.chat, [p + r for p, r in pairs], args.rounds)
    for key, ours, fastest in costs:
        print(f"  prefill, {key}: pipeline settings {[round(x) for x in ours]}, llama.cpp fastest "
              f"{[round(x) for x in fastest]} tokens/s; fastest/ours per round "
              f"{[round(f / o, 2) for f, o in zip(fastest, ours)]}", flush=True)

    med = statistics.median
    rows = [("generation, ours (LlamaModel.generate, %d sequences)" % batch_size, med(gen_tps)),
            ("llama_decode replay of generation's calls (same batches and logits rows)", med(decode_tps)),
            ("generation, create_chat_completion (one stream)", med(chat_tps)),
            ("generation, ours one sequence at a time", med(single_tps)),
            ("teacher forcing, ours (teacher_force_many)", med(tf_tps)),
            ("llama_decode replay of the same batches", med(raw_tps)),
            ("llama_decode replay, logits at each batch's last token only", med(prefill_tps)),
            ("teacher forcing, ours, on the echo subset", med(tf_sub_tps)),
            ("create_completion(echo=True, logprobs=1), echo subset", med(echo_tps))]
    print("\n| path | tokens/s (median of %d) |\n|---|---|" % args.rounds)
    for name, v in rows:
        print(f"| {name} | {v:.0f} |")
    tf_vs_prefill = med(tf_tps) / med(prefill_tps)
    gen_vs_decode = med(gen_tps) / med(decode_tps)
    per_round = {"gen_vs_decode": [g / d for g, d in zip(gen_tps, decode_tps)],
                 "tf_vs_prefill": [t / p for t, p in zip(tf_tps, prefill_tps)]}
    tf_vs_echo = med(tf_sub_tps) / med(echo_tps)
    gen_vs_chat = med(gen_tps) / med(chat_tps)
    print(f"\nteacher forcing vs the replay of the same batches (same logits rows): "
          f"{med(tf_tps) / med(raw_tps):.2f}; generation batched vs one sequence at a time: "
          f"{med(gen_tps) / med(single_tps):.2f}; total time {time.perf_counter() - t_start:.0f} s")
    gen.close()
    tf.close()
    chat.close()
    print(idle_verdict(start_load))
    spread = {k: f"(min {min(v):.2f}, max {max(v):.2f})" for k, v in per_round.items()}
    print(f"gen_vs_decode={gen_vs_decode:.2f} {spread['gen_vs_decode']} tf_vs_prefill={tf_vs_prefill:.2f} "
          f"{spread['tf_vs_prefill']} tf_vs_echo={tf_vs_echo:.2f} gen_vs_chat={gen_vs_chat:.2f}")


if __name__ == "__main__":
    main()
