"""How far one tokenization's probability is from the text's, and what the text event changes in
the weights (issue 37, item 2), on a run's real base responses.

For each base (p0) response of a data directory: under the base model, the sampled split's, the
canonical spelling's and the beam's figure for the response's text event; under each model with
another tokenizer (the policies on it), the canonical spelling's and the beam's. Then every
target's log-weights and ESS under the definition before this change (the common prefix every
tokenizer shares, one tokenization each: events.py at 846e2b6) and after (same-tokenizer targets
the whole sampled sequence, the others the text's probability over the base's).

    python benchmarks/text_event_study.py --config CONFIG [--width 8] [--out benchmarks/text_event_study.txt]

CONFIG's data directory must hold prompts.jsonl and responses.jsonl (stages 1 and 2, at least
the base policy's responses).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ope_prep import diagnostics as dx                                   # noqa: E402
from ope_prep.backends.llama import LlamaModel                           # noqa: E402
from ope_prep.config import load_config                                  # noqa: E402
from ope_prep.events import Lattice, NoSharedEvent, text_event           # noqa: E402
from ope_prep.files import PROMPTS, RESPONSES                            # noqa: E402
from ope_prep.records import Prompt, Response                            # noqa: E402
from ope_prep.store import read_jsonl                                    # noqa: E402
from ope_prep.text_probability import TextSearch, score_texts            # noqa: E402

BEFORE = "846e2b6"       # the last commit with the common-prefix event


def old_events_module():
    """events.py as it was at BEFORE, loaded beside today's package (it imports the package)."""
    src = subprocess.run(["git", "show", f"{BEFORE}:ope_prep/events.py"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    spec = importlib.util.spec_from_loader("ope_prep._events_before", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "ope_prep"
    sys.modules[spec.name] = mod          # dataclasses look their module up
    exec(compile(src, "events_before.py", "exec"), mod.__dict__)
    return mod


def spread(x) -> str:
    x = np.asarray(x, dtype=float)
    if not len(x):
        return "n=0"
    return (f"n={len(x)} median {np.median(x):.3g} q90 {np.quantile(x, 0.9):.3g} max {x.max():.3g} "
            f"share>0.1 {np.mean(x > 0.1):.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--width", type=int, default=8, help="beam width for the text's figure (default 8)")
    ap.add_argument("--explore-share", type=float, default=1e-4)
    ap.add_argument("--out", default=None, help="also append the output to this file")
    args = ap.parse_args()
    config = load_config(args.config)
    out_lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        out_lines.append(s)

    base = config.base_policy
    base_model = config.policy(base).model
    prompts = {p.prompt_id: p for p in read_jsonl(config.data_dir / PROMPTS, Prompt)}
    responses = [r for r in read_jsonl(config.data_dir / RESPONSES, Response) if r.policy == base]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    say(f"# text_event_study {time.strftime('%Y-%m-%d %H:%M')} UTC, commit {commit}, load {open('/proc/loadavg').read().split()[0]}, "
        f"config {args.config}, {len(responses)} {base} responses, beam width {args.width}, explore_share {args.explore_share:g}")

    models = {k: LlamaModel(config.model_path(k), n_ctx=config.models[k].n_ctx, n_seq=4,
                            chat_template=config.models[k].chat_template)
              for k in dict.fromkeys(p.model for p in config.policies)}
    toks = {k: m.chat for k, m in models.items()}
    vocab = {k: t.vocab_digest() for k, t in toks.items()}
    lattices = {k: Lattice(t) for k, t in toks.items()}
    old = old_events_module()
    base_tok = toks[base_model]

    events, old_events = {}, {}
    for r in responses:
        events[r.prompt_id] = text_event(r, base_tok)
        try:
            old_events[r.prompt_id] = old.scored_event(r, base_model, toks, vocab)
        except old.NoSharedEvent as e:
            old_events[r.prompt_id] = e
    resp = {r.prompt_id: r for r in responses}
    pids = list(resp)

    # The text event under the base policy and each policy whose model has another tokenizer.
    text_policies = [base] + [p.name for p in config.policies if vocab[p.model] != vocab[base_model]]
    figures: dict[str, dict[str, object]] = {}
    started = time.perf_counter()
    for name in text_policies:
        pol = config.policy(name)
        m, lat = models[pol.model], lattices[pol.model]
        stops = m.chat.end_of_generation_tokens()
        jobs = []
        for pid in pids:
            ev = events[pid]
            seeds = ([ev.sampled] if name == base else []) + [lat.spell(ev.text)]
            jobs.append((m.chat.prompt_tokens(pol.system_prompt, prompts[pid].prompt), pol.temperature,
                         TextSearch(lat, ev, stops, seeds, args.width, args.explore_share)))
        results = []
        for i in range(0, len(jobs), 16):
            results += score_texts(m, jobs[i:i + 16])
        figures[name] = dict(zip(pids, results))
        say(f"{name}: text events scored in {time.perf_counter() - started:.0f} s")

    # Under each policy, the sequences of the old and the new events, teacher-forced.
    def tf(name: str, items: dict[str, list[int]], stop_of: dict[str, bool]) -> dict[str, float]:
        pol = config.policy(name)
        m = models[pol.model]
        stops = m.chat.end_of_generation_tokens()
        keys = list(items)
        vals = m.teacher_force_many([(m.chat.prompt_tokens(pol.system_prompt, prompts[k].prompt), items[k],
                                      pol.temperature, stops if stop_of[k] else None) for k in keys])
        return {k: (math.fsum(v) if not isinstance(v, Exception) else math.nan) for k, v in zip(keys, vals)}

    started = time.perf_counter()
    ok_old = [pid for pid in pids if not isinstance(old_events[pid], Exception)]
    old_lp = {p.name: tf(p.name, {pid: old_events[pid].tokens[p.model] for pid in ok_old},
                         {pid: old_events[pid].stops for pid in ok_old}) for p in config.policies}
    whole_lp = {p.name: tf(p.name, {pid: list(resp[pid].token_ids) for pid in pids},
                           {pid: resp[pid].finish_reason == "stop" for pid in pids})
                for p in config.policies if vocab[p.model] == vocab[base_model]}
    say(f"one teacher-forcing pass per (response, policy), old events and whole sequences: "
        f"{time.perf_counter() - started:.0f} s for {len(ok_old) * len(config.policies) + len(pids) * len(whole_lp)} sequences")

    say()
    say("## One tokenization against the text's probability (beam), nats (beam minus path: >= 0)")
    for name in text_policies:
        res = figures[name]
        good = [pid for pid in pids if not isinstance(res[pid], Exception)]
        canon = [res[pid].logprob - res[pid].seed_logprobs[-1] for pid in good]
        say(f"- {name} ({config.policy(name).model}): canonical spelling {spread(canon)}")
        if name == base:
            sampled = [res[pid].logprob - res[pid].seed_logprobs[0] for pid in good]
            noncanon = [pid for pid in good if list(events[pid].sampled) != lattices[config.policy(name).model].spell(events[pid].text)]
            say(f"- {name}: sampled split {spread(sampled)}; {len(noncanon)} of {len(good)} responses sampled a "
                "split that is not the canonical spelling")
            for pid in sorted(noncanon, key=lambda p: -(res[p].logprob - res[p].seed_logprobs[-1]))[:5]:
                say(f"    {pid}: canonical {res[pid].seed_logprobs[-1] - res[pid].logprob:+.2f}, sampled "
                    f"{res[pid].seed_logprobs[0] - res[pid].logprob:+.2f} nats from the beam's {res[pid].logprob:.2f}")
        paths = [len(res[pid].paths) for pid in good]
        bound = [res[pid].dropped_bound for pid in good]
        gain = [res[pid].logprob - res[pid].path_logprobs[0] for pid in good]
        say(f"    paths per text: mean {np.mean(paths):.2f}; beam over its best path: {spread(gain)}; "
            f"dropped bound: median {np.median(bound):.3g}, max {max(bound):.3g}")
        errs = [pid for pid in pids if isinstance(res[pid], Exception)]
        if errs:
            say(f"    {len(errs)} failed: {errs[0]}: {res[errs[0]]}")

    say()
    say("## Weights before (common prefix, one tokenization) and after (whole sequence / the text's probability)")
    n_old_fail = len(pids) - len(ok_old)
    say(f"- before: {n_old_fail} of {len(pids)} responses had no shared event (quarantined: "
        f"{', '.join(pid for pid in pids if pid not in ok_old)[:200]}); "
        f"{sum(1 for pid in ok_old if not old_events[pid].complete)} scored on a prefix "
        f"(mean {np.mean([old_events[pid].scored_bytes / max(1, len(events[pid].text)) for pid in ok_old if not old_events[pid].complete] or [1]):.0%} of the text)")
    for t in config.target_policies:
        pol = config.policy(t)
        before = np.array([old_lp[t][pid] - old_lp[base][pid] for pid in ok_old])
        if vocab[pol.model] == vocab[base_model]:
            after = np.array([whole_lp[t][pid] - whole_lp[base][pid] for pid in pids])
            how = "whole sampled sequence"
        else:
            good = [pid for pid in pids if not isinstance(figures[t][pid], Exception)]
            after = np.array([figures[t][pid].logprob - figures[base][pid].logprob for pid in good])
            canon_only = np.array([figures[t][pid].seed_logprobs[-1] - figures[base][pid].seed_logprobs[0] for pid in good])
            how = "text's probability"
            say(f"- {t}: one tokenization each (canonical / sampled, whole text) ESS "
                f"{dx.overlap(canon_only, np.zeros_like(canon_only), np.ones_like(canon_only))['ess_fraction']:.1%}")
        ess = lambda lw: dx.overlap(lw, np.zeros_like(lw), np.ones_like(lw))["ess_fraction"]   # noqa: E731
        say(f"- {t}: before ESS {ess(before):.1%} over {len(before)} (log w median {np.median(before):.3g}); "
            f"after ({how}) ESS {ess(after):.1%} over {len(after)} (log w median {np.median(after):.3g})")
        if vocab[pol.model] == vocab[base_model]:
            moved = [abs((old_lp[t][pid] - old_lp[base][pid]) - (whole_lp[t][pid] - whole_lp[base][pid])) for pid in ok_old]
            say(f"    |log w after - before| per response: {spread(moved)}")
        else:
            moved = [abs((old_lp[t][pid] - old_lp[base][pid]) - (figures[t][pid].logprob - figures[base][pid].logprob))
                     for pid in ok_old if not isinstance(figures[t][pid], Exception)]
            say(f"    |log w after - before| per response: {spread(moved)}")
    for m in models.values():
        m.close()
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n".join(out_lines) + "\n\n")


if __name__ == "__main__":
    main()
