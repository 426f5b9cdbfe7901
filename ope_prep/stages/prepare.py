"""Stage 1: sample N prompts from a weighted mix of sources, filtered, deduplicated, with provenance.

The sample of N is the first N of one seeded pass over the source, so a larger N extends a
smaller one: rerun with a larger N and every later stage keeps its finished units and computes
only the new prompts' (a smaller N summarizes the first N; nothing is deleted). A prompt is
taken only if, rendered for every policy with its model's own template and tokenizer, it leaves
room for generation.max_tokens in that model's context, and in the judge's and oracle's
(rubric and examples included) where their context is known; how many were passed over, and
why, is printed and kept in run.json, per source.
"""

from __future__ import annotations

import argparse

from ..backends.providers import local_tokenizer
from ..config import Config
from ..errors import EXIT_OK, InputError, RefusedError
from ..files import PROMPTS, RUN_PARAMS
from ..fingerprint import flatten, model_identity
from ..records import Prompt
from ..rubrics import RUBRICS
from ..sources.mix import Sample, active_sources, reasons_text, sample_prompts
from ..sources.registry import describe
from ..commands import run_command
from ..store import read_jsonl, write_json, write_jsonl
from ..judging import judge_messages, rubric_digest

OUTPUTS = [PROMPTS, RUN_PARAMS]


class _ListSources(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(describe())
        parser.exit()


def add_args(parser) -> None:
    parser.add_argument("--samples", type=int, default=None, help="number of prompts (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="run seed (default: run.seed in the config)")
    parser.add_argument("--only", action="append", default=[], metavar="GROUP",
                        help="use only the sources of this group of source.mix (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GROUP",
                        help="leave out the sources of this group of source.mix (repeatable)")
    parser.add_argument("--list-sources", nargs=0, action=_ListSources, help="print the source registry and exit")
    parser.add_argument("--preview", type=int, default=None, metavar="K",
                        help="print K sampled prompts and the per-source counts; write nothing "
                             "(with --samples N: draw N, print the first K)")


def samples(args) -> int:
    return 10000 if args.samples is None else args.samples


def run_size(config: Config, args) -> int:
    return samples(args)


def unit_count(config: Config, n_prompts: int) -> int:
    return n_prompts


def disk_estimate(config: Config, n_prompts: int) -> int:
    return n_prompts * (config.source.max_prompt_chars * 4 + 300)


def run_seed(config: Config, args) -> int:
    return config.run.seed if args.seed is None else args.seed


def fingerprint(config: Config, args, ck: dict) -> dict:
    """What decides which prompts a run holds, in which order: the sources, the filters, the groups
    switched on, and the seed. Not N: a run grows."""
    on = [config.source.mix[i].label for i in active_sources(config, args.only, args.exclude)]
    return {**flatten(config.source.model_dump(), "source."), "seed": run_seed(config, args),
            "sources_on": ",".join(on)}


def cli_keys(args) -> dict[str, str]:
    keys = {"seed": "--seed"} if args.seed is not None else {}
    return {**keys, "sources_on": "--only/--exclude"} if args.only or args.exclude else keys


def inputs(config: Config, args, ck: dict) -> dict:
    """N, and what decides whether a prompt fits each policy's context: when these change the
    sample is drawn again, and must agree with the run's earlier one (see _check_extends)."""
    if samples(args) < 1:
        raise InputError(f"--samples must be at least 1 (got {samples(args)})")
    fit: dict[str, object] = {"fit.max_tokens": config.generation.max_tokens}
    for pol in config.policies:
        fit[f"fit.{pol.name}.system_prompt"] = pol.system_prompt
        fit.update(flatten(model_identity(config, pol.model), f"fit.{pol.name}.model."))
    for which in _scorers_with_known_context(config):
        api = getattr(config, which)
        fit[f"fit.{which}.rubric"] = rubric_digest(RUBRICS[api.rubric])
        fit.update(flatten(model_identity(config, api.model), f"fit.{which}.model."))
    return {"samples": samples(args), **fit}


def _scorers_with_known_context(config: Config) -> list[str]:
    """The judge and oracle whose context stage 1 can know: a models.<key> GGUF, in process or on
    our own llama_cpp.server (an API's context and tokenizer are its own)."""
    return [which for which in ("judge", "oracle") if getattr(config, which).kind.uses_model_file]


def context_check(config: Config, seed: int):
    """too_long(text) for sample_prompts: over source.max_prompt_tokens in the base policy's
    model's tokens; or the first policy whose rendered prompt plus max_tokens does not fit its
    model's context, counted with that model's tokenizer; or the judge's or oracle's prompt
    (rubric, examples, the prompt) plus a response of max_tokens tokens and the answer not fitting
    its model's context. Such a prompt would otherwise be quarantined after its generation and
    teacher forcing were paid for, and always the longest ones."""
    keys = [p.model for p in config.policies] + [getattr(config, w).model for w in _scorers_with_known_context(config)]
    tokenizers = {k: local_tokenizer(config, k) for k in dict.fromkeys(keys)}
    base = tokenizers[config.policy(config.base_policy).model]
    max_tokens, bound = config.generation.max_tokens, config.source.max_prompt_tokens
    scorers = [(which, getattr(config, which).model, RUBRICS[getattr(config, which).rubric])
               for which in _scorers_with_known_context(config)]

    def too_long(text: str):
        if bound is not None and len(base.tokenize_text(text)) > bound:
            return "longer than source.max_prompt_tokens"
        for pol in config.policies:
            n_ctx = config.models[pol.model].n_ctx
            if len(tokenizers[pol.model].prompt_tokens(pol.system_prompt, text)) + max_tokens > n_ctx:
                return f"prompt + generation.max_tokens over models.{pol.model}.n_ctx ({n_ctx})"
        for which, key, rubric in scorers:
            n_ctx = config.models[key].n_ctx
            # an empty response in the judge prompt, then max_tokens for it and one for the answer
            if len(tokenizers[key].chat_tokens(judge_messages(rubric, text, "", seed))) + max_tokens + 1 > n_ctx:
                return f"{which} prompt + generation.max_tokens over models.{key}.n_ctx ({n_ctx})"
        return None
    return too_long


def draw(config: Config, args, n: int) -> Sample:
    seed = run_seed(config, args)
    return sample_prompts(config, n, seed, args.only, args.exclude, context_check(config, seed))


def counts_text(sample: Sample) -> str:
    lines = []
    for label, n in sample.counts.items():
        prov = sample.provenance[label]
        lines.append(f"  {label}: {n} prompts (weight {prov['weight']:.3g}, group {prov['group']}; read "
                     f"{prov['rows_read']} of {prov['rows']} rows; passed over: {reasons_text(sample.skipped[label])})")
    return "\n".join(lines)


def read_only(config: Config, args):
    """--preview: the sample and its counts, printed; nothing written. None: not asked."""
    if args.preview is None:
        return None
    n = samples(args) if args.samples is not None else args.preview
    sample = draw(config, args, n)
    for p in sample.prompts[:args.preview]:
        text = p.prompt if len(p.prompt) <= 300 else p.prompt[:300] + " ..."
        print(f"--- {p.prompt_id} ({p.source}, row {p.source_row})\n{text}")
    print(f"[prepare] the config supplies {len(sample.prompts)} prompts (seed {run_seed(config, args)}):\n"
          + counts_text(sample))
    return EXIT_OK


def run(config: Config, args, fp: dict) -> dict:
    seed = run_seed(config, args)
    sample = draw(config, args, samples(args))
    data_dir = config.data_dir
    _check_extends(config, data_dir / PROMPTS, sample.prompts)
    print(f"[prepare] {len(sample.prompts)} prompts (seed {seed}):\n{counts_text(sample)}")
    return {PROMPTS: write_jsonl(data_dir / PROMPTS, sample.prompts),
            RUN_PARAMS: write_json(data_dir / RUN_PARAMS, {
                "samples": samples(args), "seed": seed, "counts": sample.counts,
                "skipped": sample.skipped, "sources": sample.provenance})}


def _check_extends(config: Config, path, prompts: list[Prompt]) -> None:
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
                "it, or start a new run in another data directory, or start over here keeping the old "
                f"run: {run_command(config, '--fresh')}")
