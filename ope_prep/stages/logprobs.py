"""Stage 2b: the base policy's response teacher-forced under every policy (itself too).

log p(response | prompt) under a policy = the sum over the response's tokens of
log softmax(logits / T_policy), the prompt rendered with that policy's chat template and
system prompt exactly as at generation. Under the base policy's own model the stored token
ids are scored as they were sampled; under another tokenizer the response text is tokenized
as the continuation of the rendered prompt, checked by round trip, and followed by that
model's end-of-turn token when the response ended by itself.

Each model scores PROMPTS_PER_CALL prompts' units per `LlamaModel.teacher_force_many` call:
sequences are packed several per llama_decode batch, logits are computed only at response
positions, and units with the same rendered prompt and response (p0 and pi_clone) are
decoded once and scored at each unit's own temperature. The call's units are then appended
to the work file and fsynced.
"""

from __future__ import annotations

import math

from ..config import Config, policies_keys
from ..records import Response, TeacherForced
from ..stage_cli import work_path
from ..store import WorkFile, failed_row, ok_row, read_jsonl
from .generate import load_model
from .units import RESPONSES, finish, load_prompts, progress, unit_key

LOGPROBS = "logprobs.jsonl"
OUTPUTS = [LOGPROBS]

PROMPTS_PER_CALL = 16   # prompts whose units are scored (and made durable) together
TF_SEQUENCES = 4        # sequences in flight per model; each has the model's n_ctx cells


def fingerprint(config: Config, args, ck: dict) -> dict:
    return {"input.responses": ck["generate"]["outputs"][RESPONSES]["sha256"], **policies_keys(config)}


def run(config: Config, args, fp: dict) -> dict:
    data_dir = config.data_dir
    prompts = load_prompts(data_dir)
    base = config.base_policy
    base_model = config.policy(base).model
    base_responses = {r.prompt_id: r for r in read_jsonl(data_dir / RESPONSES, Response) if r.policy == base}
    keys = [unit_key(p.prompt_id, pol.name) for p in prompts for pol in config.policies]
    work = WorkFile(work_path(data_dir, "logprobs"), fp)
    todo_total = sum(not work.done(k) for k in keys)
    print(f"[logprobs] {len(keys)} teacher-forced log-probabilities, {len(keys) - todo_total} already done")
    bar = progress("logprobs", todo_total, "seq")
    for model_key in dict.fromkeys(p.model for p in config.policies):
        policies = [pol for pol in config.policies if pol.model == model_key]
        todo = [p for p in prompts if any(not work.done(unit_key(p.prompt_id, pol.name)) for pol in policies)]
        if not todo:
            continue
        bar.set_description(f"[logprobs] {model_key}")
        model = load_model(config, model_key, n_seq=TF_SEQUENCES, repack_weights=True)
        try:
            for i in range(0, len(todo), PROMPTS_PER_CALL):
                rows, items, units = [], [], []
                for p in todo[i:i + PROMPTS_PER_CALL]:
                    resp = base_responses[p.prompt_id]
                    try:
                        if model_key == base_model:
                            tokens = resp.token_ids
                        else:
                            tokens = model.response_tokens(resp.response, resp.finish_reason == "stop")
                        error = None
                    except ValueError as e:   # the tokenizer round trip
                        tokens, error = None, str(e)
                    for pol in policies:
                        key = unit_key(p.prompt_id, pol.name)
                        if work.done(key):
                            continue
                        if error is not None:
                            rows.append(failed_row(key, error))
                            continue
                        items.append((model.prompt_tokens(pol.system_prompt, p.prompt), tokens,
                                      pol.temperature))
                        units.append((p, pol, tokens, key))
                for (p, pol, tokens, key), values in zip(units, model.teacher_force_many(items)):
                    if isinstance(values, Exception):   # too long for the context
                        rows.append(failed_row(key, str(values)))
                        continue
                    total = math.fsum(values)
                    if not math.isfinite(total) or any(v > 0 for v in values):
                        rows.append(failed_row(key, f"invalid log-probability {total!r} (positive or NaN)"))
                        continue
                    rows.append(ok_row(key, TeacherForced(prompt_id=p.prompt_id, policy=pol.name,
                                                          logprob=total, n_tokens=len(tokens),
                                                          token_ids=list(tokens))))
                work.append(rows)
                bar.update(len(rows))
        finally:
            model.close()
    bar.close()
    return {LOGPROBS: finish("logprobs", work, keys, data_dir / LOGPROBS)}
