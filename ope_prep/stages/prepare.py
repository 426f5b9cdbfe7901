"""Stage 1: sample N English single-turn prompts, deduplicated, with provenance.

The sample of N is the first N of one seeded pass over the source, so a larger N extends a
smaller one: rerun with a larger N and every later stage keeps its finished units and computes
only the new prompts' (a smaller N summarizes the first N; nothing is deleted). A prompt is
taken only if, rendered for every policy with its model's own template and tokenizer, it leaves
room for generation.max_tokens in that model's context; how many were passed over, and why,
is printed and kept in run.json.
"""

from __future__ import annotations

from ..backends.providers import local_tokenizer
from ..config import Config
from ..errors import InputError, RefusedError
from ..fingerprint import flatten, model_identity
from ..records import Prompt
from ..sources import sample_prompts
from ..store import read_jsonl, write_json, write_jsonl
from .units import PROMPTS, RUN_PARAMS

OUTPUTS = [PROMPTS, RUN_PARAMS]


def add_args(parser) -> None:
    parser.add_argument("--samples", type=int, default=10000, help="number of prompts (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="run seed (default: run.seed in the config)")


def run_seed(config: Config, args) -> int:
    return config.run.seed if args.seed is None else args.seed


def fingerprint(config: Config, args, ck: dict) -> dict:
    """What decides which prompts a run holds, in which order: the source and the seed. Not N:
    a run grows."""
    return {**flatten(config.source.model_dump(), "source."), "seed": run_seed(config, args)}


def cli_keys(args) -> dict[str, str]:
    return {"seed": "--seed"} if args.seed is not None else {}


def inputs(config: Config, args, ck: dict) -> dict:
    """N, and what decides whether a prompt fits each policy's context: when these change the
    sample is drawn again, and must agree with the run's earlier one (see _check_extends)."""
    if args.samples < 1:
        raise InputError(f"--samples must be at least 1 (got {args.samples})")
    fit: dict[str, object] = {"fit.max_tokens": config.generation.max_tokens}
    for pol in config.policies:
        fit[f"fit.{pol.name}.system_prompt"] = pol.system_prompt
        fit.update(flatten(model_identity(config, pol.model), f"fit.{pol.name}.model."))
    return {"samples": args.samples, **fit}


def context_check(config: Config):
    """too_long(text) for sample_prompts: the first policy whose rendered prompt plus
    max_tokens does not fit its model's context, counted with that model's tokenizer."""
    tokenizers = {k: local_tokenizer(config, k) for k in dict.fromkeys(p.model for p in config.policies)}
    max_tokens = config.generation.max_tokens

    def too_long(text: str):
        for pol in config.policies:
            n_ctx = config.models[pol.model].n_ctx
            if len(tokenizers[pol.model].prompt_tokens(pol.system_prompt, text)) + max_tokens > n_ctx:
                return f"prompt + generation.max_tokens over models.{pol.model}.n_ctx ({n_ctx})"
        return None
    return too_long


def run(config: Config, args, fp: dict) -> dict:
    seed = run_seed(config, args)
    prompts, skipped = sample_prompts(config, args.samples, seed, context_check(config))
    data_dir = config.data_dir
    _check_extends(data_dir / PROMPTS, prompts)
    print(f"[prepare] {len(prompts)} prompts from {prompts[0].source} (seed {seed}); "
          f"passed over: {dict(skipped) or 'none'}")
    return {PROMPTS: write_jsonl(data_dir / PROMPTS, prompts),
            RUN_PARAMS: write_json(data_dir / RUN_PARAMS, {"samples": args.samples, "seed": seed,
                                                           "skipped": dict(skipped)})}


def _check_extends(path, prompts: list[Prompt]) -> None:
    """A new sample must agree with the run's earlier one on the prompts they share: if the
    source's data changed under the same config, later stages' work would belong to other
    prompts."""
    if not path.is_file():
        return
    try:
        old = read_jsonl(path, Prompt)
    except InputError:
        return      # a damaged earlier file is replaced; unit inputs are checked one by one anyway
    for i, (a, b) in enumerate(zip(old, prompts)):
        if (a.prompt_id, a.prompt) != (b.prompt_id, b.prompt):
            raise RefusedError(
                f"{path}: prompt {i + 1} of the run's sample ({a.prompt_id}) differs from this "
                f"sample's ({b.prompt_id}): the source's data changed, or which prompts fit the policies' "
                "contexts did (generation.max_tokens, a policy's model, n_ctx or system prompt). Restore "
                "it, or start a new run in another data directory, or with --fresh (the old one is kept)")
