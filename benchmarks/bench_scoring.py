"""Stage 3 and 4 speed: in-process scoring against the llama_cpp.server path, side by side.

    python benchmarks/bench_scoring.py [--role judge|oracle] [--units 40] [--policies all] [--rounds 3]
                                       [--data benchmarks/judge_study_set.jsonl | DATA_DIR]

The units are real: the first --units responses of --policies, grouped by prompt in the file's
prompt order, as stages 3 and 4 score them. --data is the judge study's fixed set (default-run
responses of p0, pi_clone and pi_bad; one row each: prompt_id, policy, prompt, response) or a
run's data dir (prompts.jsonl and responses.jsonl). By default all the set's policies, so that a
prompt's judge prompts share their prefix (rubric, examples and the quoted prompt) as in stage
3; --policies p0 gives one response per prompt, as the oracle mostly labels.

The two paths score the same units with the same model (config's <role>.model) and rubric
(<role>.rubric), through the pipeline's own code (`open_scorer`):

* in process: provider ``local`` (`LocalScorer`: prefill, logits at the answer position only);
* server: provider ``local_server`` (`ApiScorer` through the openai client to a managed
  `llama_cpp.server`, which computes logits at every position) with the settings stages 3
  and 4 had before in-process scoring: grammar on, max_tokens 1, top_logprobs 20,
  concurrency 1. Each server round gets a data dir of its own, so its request cache is empty
  (every unit is an HTTP request; the script checks that none came from the cache).

Rounds alternate the two paths (the order flips every round). Loading the model and starting
the server happen before the clock starts. Throughput counts the judge prompts' tokens (the
in-process tokenizer's count, the same for both paths); the ratio per round is in-process
tokens/s over server tokens/s. Also printed: on how many units the two paths answer the same
digit (both run llama.cpp's one numeric path, the server through ope_prep.backends.serve, but
in different batch shapes).

The last line is exactly: score_vs_server=<median of the per-round ratios>
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ope_prep.config import Config, load_config  # noqa: E402
from ope_prep.backends.scorers import ScoringUnit, open_scorer  # noqa: E402
from ope_prep.judging import Judgement  # noqa: E402
from ope_prep.store import read_jsonl  # noqa: E402

SERVER_SETTINGS = {"provider": "local_server", "grammar": True, "max_tokens": 1, "top_logprobs": 20,
                   "concurrency": 1}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--role", choices=["judge", "oracle"], default="judge")
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "judge_study_set.jsonl"))
    ap.add_argument("--units", type=int, default=40)
    ap.add_argument("--policies", default="all", help="comma-separated, or all (every policy in --data)")
    ap.add_argument("--rounds", type=int, default=3)
    return ap.parse_args()


def load_units(data: Path, n_units: int, policies: str) -> list[ScoringUnit]:
    """The first n_units responses of `policies`, grouped by prompt in the file's prompt order."""
    if data.is_dir():
        prompts = {r["prompt_id"]: r["prompt"] for r in read_jsonl(data / "prompts.jsonl")}
        rows = [{**r, "prompt": prompts[r["prompt_id"]]} for r in read_jsonl(data / "responses.jsonl")]
    else:
        rows = list(read_jsonl(data))
    if policies != "all":
        rows = [r for r in rows if r["policy"] in policies.split(",")]
    order = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in rows))}
    rows = sorted(rows, key=lambda r: order[r["prompt_id"]])[:n_units]   # stable: policies keep their order
    return [ScoringUnit(f"{r['prompt_id']}|{r['policy']}", r["prompt_id"], r["policy"], r["prompt"], r["response"])
            for r in rows]


def server_config(config: Config, role: str, tmp: Path) -> Config:
    """The config with <role> behind a managed llama_cpp.server, data (request cache, server
    log) in tmp: written as YAML with absolute model paths and loaded as a user's would be."""
    raw = config.model_dump(mode="json", exclude={"config_path"})
    for key in raw["models"]:
        raw["models"][key]["path"] = str(config.model_path(key))
    raw["paths"]["data_dir"] = str(tmp / "data")
    raw[role].update(SERVER_SETTINGS)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return load_config(path)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


IDLE_LOAD = 1.5      # a benchmark that starts above this load is marked, and not for the README


def idle_verdict(start_load: float) -> str:
    return (f"{'idle at the start' if start_load <= IDLE_LOAD else 'NOT IDLE: the load was above 1.5 at the start'}"
            f" (load average {start_load:.2f})")


def code_version() -> str:
    """The commit, and the package's files that differ from it (others work in this tree)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    changed = git("status", "--short", "--", "ope_prep").splitlines()
    return f"commit {git('rev-parse', '--short', 'HEAD')}" + (
        f", with uncommitted changes to {', '.join(line.split()[-1] for line in changed)}" if changed else "")


def main() -> None:
    args = parse_args()
    config = load_config(args.config)
    api = getattr(config, args.role)
    need_distribution = args.role == "judge"     # as stages 3 and 4 ask
    seed = config.run.seed
    units = load_units(Path(args.data), args.units, args.policies)
    t_start = time.perf_counter()
    print(f"{args.role}: {api.model} ({config.model_path(api.model).name}), rubric {api.rubric}, "
          f"{config.generation.n_threads} threads; {len(units)} judge prompts ({len({u.prompt_id for u in units})} "
          f"prompts; policies {args.policies}) from {args.data}; server: "
          f"{', '.join(f'{k} {v}' for k, v in SERVER_SETTINGS.items() if k != 'provider')}", flush=True)
    print(f"code: {code_version()}; load average at start: {load_average()}", flush=True)

    in_process = config.model_copy(update={args.role: api.model_copy(update={"provider": "local"})})
    with open_scorer(in_process, args.role, args.role, seed, need_distribution) as local:
        n_tokens = sum(len(local.prompt_tokens(u)) for u in units)
        last: dict[str, dict] = {}      # each path's judgements in its latest round

        def run_local() -> float:
            t = time.perf_counter()
            results = list(local.score(units))
            dt = time.perf_counter() - t
            last["local"] = {u.key: j for u, j in results}
            return n_tokens / dt

        def run_server() -> float:
            with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
                cfg = server_config(config, args.role, Path(tmp))
                with open_scorer(cfg, args.role, args.role, seed, need_distribution) as server:
                    server.client.connect()                    # starts llama_cpp.server, off the clock
                    t = time.perf_counter()
                    results = list(server.score(units))
                    dt = time.perf_counter() - t
                    c = server.client.counters
                    if c.cached or c.calls != len(units):
                        raise SystemExit(f"server round: {c.calls} requests, {c.cached} from the cache, "
                                         f"for {len(units)} units")
                    last["server"] = {u.key: j for u, j in results}
                    last["server_tokens"] = c.input_tokens
            return n_tokens / dt

        local_tps, server_tps, ratios = [], [], []
        for r in range(args.rounds):
            order = [("local", run_local), ("server", run_server)]
            tps = dict((name, fn()) for name, fn in (order if r % 2 == 0 else order[::-1]))
            local_tps.append(tps["local"])
            server_tps.append(tps["server"])
            ratios.append(tps["local"] / tps["server"])
            print(f"  round {r + 1} ({'in process' if r % 2 == 0 else 'server'} first): in process "
                  f"{tps['local']:.0f} tokens/s ({n_tokens / tps['local'] / len(units):.2f} s per unit), server "
                  f"{tps['server']:.0f} tokens/s ({n_tokens / tps['server'] / len(units):.2f} s per unit), "
                  f"ratio {ratios[-1]:.2f}; load average {load_average()}", flush=True)

    same = sum(isinstance(j, Judgement) and isinstance(last["server"].get(k), Judgement)
               and last["server"][k].digit == j.digit for k, j in last["local"].items())
    med = statistics.median
    print(f"\n{n_tokens} judge-prompt tokens per round (the server counted {last['server_tokens']}); "
          f"same digit on both paths: {same} of {len(units)} units; total time "
          f"{time.perf_counter() - t_start:.0f} s\n")
    print("| path | tokens/s (median; rounds) | s per unit (median) |\n|---|---|---|")
    for name, tps in (("in process (LocalScorer)", local_tps), ("llama_cpp.server (ApiScorer)", server_tps)):
        print(f"| {name} | {med(tps):.0f} ({', '.join(f'{x:.0f}' for x in tps)}) | "
              f"{n_tokens / med(tps) / len(units):.2f} |")
    print(f"\nin process / server per round: {', '.join(f'{x:.2f}' for x in ratios)} "
          f"(spread {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"score_vs_server={med(ratios):.2f}")


if __name__ == "__main__":
    main()
