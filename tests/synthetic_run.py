"""A small synthetic pipeline run for stage-5 tests: the files of stages 1-4 and their checkpoint.

Stage 5 loads no weights, only the policies' tokenizers (to recompute each record's scored event),
so every policy is on the real SmolLM2 file and the responses are real token ids of real text. Records are kept as plain dicts so a test
can break any of them and write the files again (``write``), with the checkpoint re-marked so that
the pipeline's own verification of earlier stages passes and stage 5's checks are what is tested.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from ope_prep import checkpoint  # noqa: E402
from ope_prep.records import scored_digest  # noqa: E402
from ope_prep.sources.load import text_digest  # noqa: E402
from ope_prep.store import file_manifest  # noqa: E402

SMOL = PROJECT_DIR / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = "the a cat sat on mat and then it ran far away to see what is there in sun".split()
BASE, CLONE = "p0", "pi_clone"
TARGETS = ["pi_clone", "pi_bad", "pi_big"]
POLICIES = [BASE, *TARGETS]

FILES = {  # stage -> its output files, as stages 1-4 name them
    "prepare": ["prompts.jsonl", "run.json"],
    "generate": ["responses.jsonl"],
    "logprobs": ["logprobs.jsonl", "self_consistency.jsonl"],
    "judge": ["judge_scores.jsonl"],
    "oracle": ["oracle_labels.jsonl"],
}


@dataclass
class Run:
    root: Path
    config_path: Path
    data_dir: Path
    seed: int
    rows: dict[str, list[dict]] = field(default_factory=dict)   # file name -> records
    run_json: dict = field(default_factory=dict)

    def find(self, name: str, prompt_id: str, policy: str) -> dict:
        return next(r for r in self.rows[name] if r["prompt_id"] == prompt_id and r["policy"] == policy)

    def write(self, mark: bool = True) -> None:
        """Write every file (NaN and Infinity as JSON's non-standard tokens) and mark stages 1-4."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name, rows in self.rows.items():
            (self.data_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (self.data_dir / "run.json").write_text(json.dumps(self.run_json, indent=2) + "\n")
        if mark:
            self.mark()

    def mark(self) -> None:
        for stage, files in FILES.items():
            outputs = {f: file_manifest(self.data_dir / f) for f in files if (self.data_dir / f).exists()}
            checkpoint.mark_complete(self.data_dir, stage, {"synthetic": True}, outputs)


def write_config(root: Path, data_dir: Path, validation: dict | None = None,
                 clone_policy: str | None = CLONE) -> Path:
    model = SMOL
    cfg = {
        "paths": {"data_dir": str(data_dir)},
        "run": {"seed": 7},
        "source": {"mix": [{"type": "sharegpt"}]},
        "models": {"m": {"path": str(model)}},
        "base_policy": BASE,
        "clone_policy": clone_policy,
        "policies": [{"name": p, "model": "m", "system_prompt": "You are a helpful assistant.",
                      "temperature": 0.7} for p in POLICIES],
        "judge": {"provider": "local_server", "model": "m"},
        "oracle": {"provider": "local_server", "model": "m"},
    }
    if validation:
        cfg["validation"] = validation
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def make_run(root: Path, n: int = 40, seed: int = 0, write: bool = True, **config_kw) -> Run:
    """n prompts x 4 policies of plausible data: every check passes."""
    from ope_prep.backends.llama import load_tokenizer
    tok = load_tokenizer(str(SMOL))
    stop_token = tok.end_of_turn
    rng = np.random.default_rng(seed)
    data_dir = root / "data"
    run = Run(root=root, config_path=write_config(root, data_dir, **config_kw), data_dir=data_dir,
              seed=seed, run_json={"samples": n, "seed": 1000 + seed, "skipped": {}})
    prompts, responses, logprobs, self_checks, judge, oracle = [], [], [], [], [], []
    offset = {"p0": 0.0, "pi_clone": 0.0, "pi_bad": -0.35, "pi_big": 0.1}
    for i in range(n):
        pid = f"q{i:04d}"
        question = f"Question {i}: what is {i} + {i}? — ünïcode"
        prompts.append({"prompt_id": pid, "prompt": question, "source": "synthetic", "source_row": i,
                        "source_id": f"conv-{i}", "source_revision": "synthetic",
                        "text_digest": text_digest(question)})
        quality = rng.uniform(0.3, 0.8)
        toks = {}
        for pol in POLICIES:
            text = f"{pol} says {2 * i}: " + " ".join(rng.choice(WORDS, int(rng.integers(2, 40))))
            stop = bool(rng.random() < 0.8)
            ids = tok.tokenize_text(text) + ([stop_token] if stop else [])
            n_tok = len(ids)
            lps = (-rng.exponential(float(rng.uniform(0.3, 2.0)), n_tok)).tolist()
            toks[pol] = (n_tok, ids, lps, len(text.encode()))
            responses.append({"prompt_id": pid, "policy": pol, "response": text,
                              "token_ids": ids, "token_logprobs": lps, "sampling_logprob": math.fsum(lps),
                              "n_tokens": n_tok, "finish_reason": "stop" if stop else "length",
                              "seed": int(rng.integers(0, 2**62))})
            # Teacher forcing in a pass of its own reproduces the sampler's values (float noise).
            self_checks.append({"prompt_id": pid, "policy": pol,
                                "token_logprobs": [min(v + float(rng.normal(0, 1e-12)), 0.0) for v in lps]})
            q = float(np.clip(quality + offset[pol] + rng.normal(0, 0.1), 0, 1))
            judge.append({"prompt_id": pid, "policy": pol, "score": round(q * 10) / 10,
                          "mean": float(np.clip(q + rng.normal(0, 0.03), 0, 1)),
                          "variance": float(rng.uniform(0, 0.05)), "raw": str(round(q * 9)),
                          "input_digest": scored_digest(question, text)})
            oracle.append({"prompt_id": pid, "policy": pol,
                           "split": "calibration" if pol == BASE else "validation",
                           "label": float(np.clip(q + rng.normal(0, 0.1), 0, 1)), "raw": "x",
                           "input_digest": scored_digest(question, text)})
        n0, ids0, lps0, bytes0 = toks[BASE]
        base_tf = [min(v + float(rng.normal(0, 1e-12)), 0.0) for v in lps0]   # float noise only
        tf = {"p0": base_tf, "pi_clone": base_tf,
              "pi_bad": [v - float(rng.uniform(0.2, 0.6)) for v in base_tf],
              "pi_big": [min(v + float(rng.normal(0, 0.3)), 0.0) for v in base_tf]}
        for pol in POLICIES:
            logprobs.append({"prompt_id": pid, "policy": pol, "logprob": math.fsum(tf[pol]), "n_tokens": n0,
                             "token_ids": ids0, "token_logprobs": tf[pol],
                             "scored_bytes": bytes0, "complete": True})
    # Oracle subsets: a seeded quarter of the base responses, a quarter of each target's.
    keep = set()
    for pol in POLICIES:
        for j in rng.choice(n, size=min(n, max(2, n // 4)), replace=False):
            keep.add((f"q{j:04d}", pol))
    oracle = [o for o in oracle if (o["prompt_id"], o["policy"]) in keep]
    run.rows = {"prompts.jsonl": prompts, "responses.jsonl": responses, "logprobs.jsonl": logprobs,
                "base_text_logprobs.jsonl": [],      # one tokenizer: no text events
                "self_consistency.jsonl": self_checks, "judge_scores.jsonl": judge,
                "oracle_labels.jsonl": oracle}
    if write:
        run.write()
    return run
