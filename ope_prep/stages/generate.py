"""Stage 2: one response per (prompt, policy), sampled with the policy's temperature only."""

from __future__ import annotations

from ..backends.llama import LlamaModel, PromptTooLong
from ..config import Config, model_identity, policies_keys
from ..records import Response
from ..stage_cli import work_path
from ..store import WorkFile, failed_row, ok_row, read_jsonl
from .units import RESPONSES, load_prompts, progress, unit_key, unit_seed, finish

OUTPUTS = [RESPONSES]


def fingerprint(config: Config, args, ck: dict) -> dict:
    return {"input.prompts": ck["prepare"]["outputs"]["prompts.jsonl"]["sha256"],
            "input.run": ck["prepare"]["outputs"]["run.json"]["sha256"],
            "generation.max_tokens": config.generation.max_tokens,
            **policies_keys(config)}


def load_model(config: Config, model_key: str, n_seq: int) -> LlamaModel:
    m = config.models[model_key]
    return LlamaModel(config.model_path(model_key), n_ctx=m.n_ctx, n_seq=n_seq,
                      n_threads=config.generation.n_threads, chat_template=m.chat_template)


def run(config: Config, args, fp: dict) -> dict:
    data_dir = config.data_dir
    prompts = load_prompts(data_dir)
    run_seed = read_jsonl_seed(data_dir)
    keys = [unit_key(p.prompt_id, pol.name) for p in prompts for pol in config.policies]
    work = WorkFile(work_path(data_dir, "generate"), fp)
    if work.repaired_bytes:
        print(f"[generate] cut a torn last line ({work.repaired_bytes} bytes) from {work.path}")
    todo_total = sum(not work.done(k) for k in keys)
    print(f"[generate] {len(keys)} responses, {len(keys) - todo_total} already done")
    max_tokens = config.generation.max_tokens
    bar = progress("generate", todo_total, "resp")
    for model_key in dict.fromkeys(p.model for p in config.policies):
        todo = [(p, pol) for p in prompts for pol in config.policies
                if pol.model == model_key and not work.done(unit_key(p.prompt_id, pol.name))]
        if not todo:
            continue
        bar.set_description(f"[generate] {model_key}")
        model = load_model(config, model_key, config.generation.batch_size)
        try:
            for i in range(0, len(todo), config.generation.batch_size):
                batch, jobs, rows = todo[i:i + config.generation.batch_size], [], []
                for p, pol in batch:
                    jobs.append((model.prompt_tokens(pol.system_prompt, p.prompt), pol.temperature,
                                 unit_seed(run_seed, p.prompt_id, pol.name)))
                runnable = []
                for (p, pol), job in zip(batch, jobs):
                    if len(job[0]) + max_tokens > model.n_ctx_per_seq:
                        rows.append(failed_row(unit_key(p.prompt_id, pol.name),
                                    f"prompt is {len(job[0])} tokens; with max_tokens {max_tokens} it "
                                    f"exceeds models.{model_key}.n_ctx {model.n_ctx_per_seq}"))
                    else:
                        runnable.append(((p, pol), job))
                gens = model.generate([job for _, job in runnable], max_tokens) if runnable else []
                for ((p, pol), job), g in zip(runnable, gens):
                    text_ids = g.token_ids[:-1] if g.finish_reason == "stop" else g.token_ids
                    rows.append(ok_row(unit_key(p.prompt_id, pol.name), Response(
                        prompt_id=p.prompt_id, policy=pol.name, response=model.detokenize(text_ids),
                        token_ids=g.token_ids, sampling_logprob=g.logprob, n_tokens=len(g.token_ids),
                        finish_reason=g.finish_reason, seed=job[2])))
                work.append(rows)
                bar.update(len(batch))
        finally:
            model.close()
    bar.close()
    return {RESPONSES: finish("generate", work, keys, data_dir / RESPONSES)}


def read_jsonl_seed(data_dir) -> int:
    import json
    return int(json.loads((data_dir / "run.json").read_text())["seed"])
