"""Stage 1: sample N English single-turn prompts, deduplicated, with provenance."""

from __future__ import annotations

from ..config import Config
from ..fingerprint import flatten
from ..sources import sample_prompts
from ..store import write_json, write_jsonl
from .units import PROMPTS, RUN_PARAMS

OUTPUTS = [PROMPTS, RUN_PARAMS]


def add_args(parser) -> None:
    parser.add_argument("--samples", type=int, default=10000, help="number of prompts (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="run seed (default: run.seed in the config)")


def run_seed(config: Config, args) -> int:
    return config.run.seed if args.seed is None else args.seed


def fingerprint(config: Config, args, ck: dict) -> dict:
    if args.samples < 1:
        from ..errors import InputError
        raise InputError(f"--samples must be at least 1 (got {args.samples})")
    return {**flatten(config.source.model_dump(), "source."),
            "samples": args.samples, "seed": run_seed(config, args)}


def run(config: Config, args, fp: dict) -> dict:
    seed = run_seed(config, args)
    prompts, skipped = sample_prompts(config, args.samples, seed)
    print(f"[prepare] {len(prompts)} prompts from {prompts[0].source} (seed {seed}); "
          f"passed over: {dict(skipped) or 'none'}")
    data_dir = config.data_dir
    return {PROMPTS: write_jsonl(data_dir / PROMPTS, prompts),
            RUN_PARAMS: write_json(data_dir / RUN_PARAMS, {"samples": args.samples, "seed": seed,
                                                           "skipped": dict(skipped)})}
