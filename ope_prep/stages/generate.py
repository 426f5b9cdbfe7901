"""Stage 2: one response per (prompt, policy), sampled with the policy's temperature only.

Each model's units stream through its provider's `generate_iter` (in process: up to
generation.batch_size sequences decode together, a finished sequence's slot takes the next unit at once, and units
sharing a rendered prompt (p0 and pi_clone) share its prefill; on an engine: concurrent
requests, see backends/remote.py). Finished units are appended
to the work file and fsynced every batch_size units; a unit's result depends only on its own
seed, so a resumed run produces exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import asdict

from ..backends.llama import response_text
from ..backends.providers import model_usage, policy_model
from ..config import Config
from ..files import RESPONSES, usage_file
from ..fingerprint import policies_keys
from ..records import Response, UsageTotals
from ..store import WorkFile, failed_row, input_digest, ok_row, write_json
from .units import (BYTES_PER_TOKEN, exception_row, finish, load_prompts, progress, read_run_seed, run_identity,
                    stop_on_api_errors, unit_key, unit_seed, unit_work, upstream_digests, written_bytes)

GENERATE_USAGE = usage_file("generate")
OUTPUTS = [RESPONSES, GENERATE_USAGE]


def fingerprint(config: Config, args, ck: dict) -> dict:
    return {**run_identity(ck), "generation.max_tokens": config.generation.max_tokens, **policies_keys(config)}


def inputs(config: Config, args, ck: dict) -> dict:
    return upstream_digests(ck, ["prepare"])


def unit_count(config: Config, n_prompts: int) -> int:
    return n_prompts * len(config.policies)


def disk_estimate(config: Config, n_prompts: int) -> int:
    return written_bytes(unit_count(config, n_prompts), BYTES_PER_TOKEN * config.generation.max_tokens + 2000)


def run(config: Config, args, fp: dict) -> dict:
    data_dir = config.data_dir
    prompts = load_prompts(data_dir)
    run_seed = read_run_seed(data_dir)
    keys = [unit_key(p.prompt_id, pol.name) for p in prompts for pol in config.policies]
    inputs = {unit_key(p.prompt_id, pol.name): input_digest(p.prompt) for p in prompts for pol in config.policies}
    with unit_work("generate", config, fp, inputs) as work:
        todo_total = sum(not work.settled(k) for k in keys)
        print(f"[generate] {len(keys)} responses, {len(keys) - todo_total} already done")
        usage: dict[str, dict] = {}
        with progress("generate", todo_total, "resp") as bar, stop_on_api_errors("generate", work, keys):
            for model_key in dict.fromkeys(p.model for p in config.policies):
                todo = [(p, pol) for p in prompts for pol in config.policies
                        if pol.model == model_key and not work.settled(unit_key(p.prompt_id, pol.name))]
                if todo:
                    bar.set_description(f"[generate] {model_key}")
                    usage[model_key] = asdict(_generate_model(config, model_key, todo, run_seed, work, bar))
        usage_manifest = write_json(data_dir / GENERATE_USAGE, usage)
        return {**finish("generate", data_dir, [work], {RESPONSES: keys}), GENERATE_USAGE: usage_manifest}


def _generate_model(config: Config, model_key: str, todo: list, run_seed: int, work: WorkFile, bar) -> UsageTotals:
    """Generate one model's units (in process or on its engine), saving them as they finish."""
    max_tokens = config.generation.max_tokens
    flush_every = config.generation.batch_size
    model = policy_model(config, model_key, config.generation.batch_size, "generate")
    rows: list[dict] = []
    units: list[tuple] = []     # job index -> (prompt, policy, seed)
    tokens = 0

    def jobs():
        """Units as jobs, rendered when a slot frees; one too long for the context is
        recorded as failed instead."""
        for p, pol in todo:
            prompt = model.chat.prompt_tokens(pol.system_prompt, p.prompt)
            if len(prompt) + max_tokens > model.n_ctx_per_seq:
                rows.append(failed_row(unit_key(p.prompt_id, pol.name),
                            f"prompt is {len(prompt)} tokens; with max_tokens {max_tokens} it "
                            f"exceeds models.{model_key}.n_ctx {model.n_ctx_per_seq}",
                            certain=True, prompt_id=p.prompt_id))
                continue
            seed = unit_seed(run_seed, p.prompt_id, pol.name)
            units.append((p, pol, seed))
            yield prompt, pol.temperature, seed

    def flush():
        work.append(rows)
        bar.update(len(rows))
        rows.clear()

    try:
        for j, g in model.generate_iter(jobs(), max_tokens):
            p, pol, seed = units[j]
            key = unit_key(p.prompt_id, pol.name)
            if isinstance(g, Exception):
                rows.append(exception_row(key, g, p.prompt_id))
            else:
                tokens += len(g.token_ids)
                text_ids = g.token_ids[:-1] if g.finish_reason == "stop" else g.token_ids
                text, text_bytes_hex = response_text(model.chat, text_ids)
                rows.append(ok_row(key, Response(
                    prompt_id=p.prompt_id, policy=pol.name, response=text, token_ids=g.token_ids,
                    token_logprobs=g.token_logprobs, sampling_logprob=g.logprob,
                    n_tokens=len(g.token_ids), finish_reason=g.finish_reason, seed=seed,
                    text_bytes_hex=text_bytes_hex)))
            if len(rows) >= flush_every:
                flush()
        return model_usage(model, tokens)
    finally:
        flush()
        model.close()
