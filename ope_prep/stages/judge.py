"""Stage 3: a judge score for every (prompt, policy) response, and the scoring code the oracle shares.

How a response is scored (one chat call per unit, temperature 0):

* The judge sees a fixed instruction, three short worked examples (each answered with one digit:
  they make a digit by far the most likely first token, so the digits' probabilities are
  informative even for a small model), then the user's prompt and the response. It sees
  nothing else: not the policy's name or system prompt, no key, no file path.
* It answers with ONE digit 0-9 (``grammar: true`` makes llama_cpp.server constrain the answer to
  ``[0-9]``; an API model is asked in words and parsed). ``score`` = that digit / 9, on [0, 1]:
  deterministic.
* ``mean`` and ``variance``: the distribution over the digit tokens "0".."9" (a leading space
  allowed: " 7" counts as 7) at the answer's first digit position, from that position's
  ``top_logprobs`` together with the chosen token itself, renormalized over the digits found;
  the moments of digit / 9 under it. A digit outside the top_logprobs counts as probability 0.
  With llama_cpp.server these log-probabilities are the model's raw ones (before the grammar),
  which is exactly the distribution of interest: the grammar only forbids the non-digits.
* Output that cannot be read (no digit, a number of two digits, no log-probabilities at the
  digit) is recorded as a failed unit with the judge's text, never as a score; the reply is
  not served from the request cache, so the next run asks again.

With a local server, text from the prompts and responses that spells one of the served
model's control tokens (``<|im_end|>``, ``<start_of_turn>``, ...) gets an invisible WORD JOINER
after its first character: llama_cpp.server tokenizes the rendered chat with special tokens on,
and a response must not be able to end its own turn and answer for the judge.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

from ..backends.api import ApiClient, BudgetExceeded, FatalApiError, Reply, RequestFailed
from ..backends.server import LlamaServer, vocab_texts
from ..config import Config
from ..fingerprint import api_keys, model_identity
from ..errors import PipelineError
from ..records import JudgeScore, Response
from ..stage_cli import work_path
from ..store import WorkFile, failed_row, ok_row, read_jsonl, write_json
from .units import RESPONSES, finish, load_prompts, progress, unit_key

JUDGE_SCORES = "judge_scores.jsonl"
JUDGE_USAGE = "judge_usage.json"
OUTPUTS = [JUDGE_SCORES, JUDGE_USAGE]

SYSTEM_PROMPT = (
    "You are an impartial judge of AI assistant responses. You are shown a user's prompt and an "
    "assistant's response to it. Rate how well the response serves the user: helpful, correct, "
    "relevant and clear. Use a scale from 0 (useless, wrong or harmful) to 9 (excellent). "
    "Answer with a single digit from 0 to 9 and nothing else.")
USER_TEMPLATE = ("[User prompt]\n{prompt}\n[End of user prompt]\n\n"
                 "[Assistant response]\n{response}\n[End of assistant response]\n\n"
                 "Rating (one digit, 0-9):")
EXAMPLES = [   # (prompt, response, rating)
    ("What is the capital of France?", "The capital of France is Paris.", 9),
    ("How many legs does a spider have?", "Spiders are insects, so they have six legs.", 1),
    ("Give me one tip for sleeping better.", "Sleep more.", 4),
]
TEMPLATE_DIGEST = hashlib.sha256(json.dumps([SYSTEM_PROMPT, USER_TEMPLATE, EXAMPLES]).encode()).hexdigest()[:16]

_WORD_JOINER = "\u2060"
_SPECIAL_CANDIDATE = re.compile(r"<[^<>\s]{1,64}>|\[[^\[\]\s]{1,64}\]")
_APPEND_EVERY_ROWS = 32
_APPEND_EVERY_S = 2.0


# ---- the judge's prompt and the reading of its answer ------------------------------------

def neutralize(text: str, specials: frozenset[str]) -> str:
    """Break up spellings of the served model's control tokens (see the module docstring)."""
    if not specials:
        return text
    return _SPECIAL_CANDIDATE.sub(
        lambda m: m.group()[0] + _WORD_JOINER + m.group()[1:] if m.group() in specials else m.group(), text)


def judge_messages(prompt: str, response: str, specials: frozenset[str] = frozenset()) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for ex_prompt, ex_response, rating in EXAMPLES:
        messages.append({"role": "user", "content": USER_TEMPLATE.format(prompt=ex_prompt, response=ex_response)})
        messages.append({"role": "assistant", "content": str(rating)})
    messages.append({"role": "user", "content": USER_TEMPLATE.format(
        prompt=neutralize(prompt, specials), response=neutralize(response, specials))})
    return messages


class Unparsable(ValueError):
    pass


@dataclass
class Judgement:
    digit: int
    score: float       # digit / 9
    mean: float        # E[digit / 9] under the digit distribution
    variance: float
    raw: str           # the judge's text


def _digit_of(token: str) -> Optional[int]:
    t = token.strip()
    return int(t) if len(t) == 1 and t in "0123456789" else None


def parse_judgement(reply: Reply, need_distribution: bool = True) -> Judgement:
    """The digit answer and (if asked) the distribution over digits at its position."""
    text = reply.content or ""
    m = re.search(r"[0-9]", text)
    if m is None:
        raise Unparsable("no digit in the answer")
    if text[m.end():m.end() + 1].isdigit():
        raise Unparsable("the answer is a number of more than one digit")
    digit = int(m.group())
    score = digit / 9
    if not need_distribution:
        return Judgement(digit, score, score, 0.0, text)
    if not reply.logprobs:
        raise Unparsable("the reply has no log-probabilities")
    at = next((t for t in reply.logprobs if re.search(r"[0-9]", t["token"])), None)
    if at is None or _digit_of(at["token"]) != digit:
        raise Unparsable("the answer's digit is not a token of its own")
    logprob_of: dict[str, float] = {at["token"]: at["logprob"]}
    for tok, lp in at["top"]:
        logprob_of.setdefault(tok, lp)
    probs: dict[int, float] = {}
    for tok, lp in logprob_of.items():
        d = _digit_of(tok)
        if d is not None and lp is not None and math.isfinite(lp):
            probs[d] = probs.get(d, 0.0) + math.exp(lp)
    total = sum(probs.values())
    if not total > 0:
        raise Unparsable("no digit token among the top log-probabilities")
    mean = sum(p * d / 9 for d, p in probs.items()) / total
    variance = sum(p * (d / 9 - mean) ** 2 for d, p in probs.items()) / total
    return Judgement(digit, score, min(max(mean, 0.0), 1.0), max(variance, 0.0), text)


# ---- what the judge and the oracle share: client, server, the scoring loop ------------------

@contextmanager
def api_client(config: Config, which: str, stage: str) -> Iterator[tuple[ApiClient, frozenset[str]]]:
    """The client for ``config.<which>``; for a local_server provider, a managed llama_cpp.server
    that is started on the first request not in the cache and stopped on the way out."""
    api = getattr(config, which)
    with ExitStack() as stack:
        if api.provider == "local_server":
            server = LlamaServer(config, [api.model], stage)
            stack.callback(server.stop)

            def connect() -> str:
                t = time.monotonic()
                print(f"[{stage}] starting llama_cpp.server for {api.model} (log: {server.log_path})",
                      file=sys.stderr)
                server.start()
                print(f"[{stage}] server ready in {time.monotonic() - t:.1f}s", file=sys.stderr)
                return server.base_url

            template = config.models[api.model].chat_template
            identity = {"provider": "local_server", **model_identity(config, api.model),
                        "chat_template": hashlib.sha256(template.encode()).hexdigest() if template else None}
            specials = vocab_texts(str(config.model_path(api.model)))[2]
        else:
            def connect() -> Optional[str]:
                return api.base_url
            identity = {"provider": api.provider, "base_url": api.base_url}
            specials = frozenset()
        client = ApiClient(api, which, stage, config.data_dir, connect, identity)
        stack.callback(client.close)
        yield client, specials


@dataclass
class ScoringUnit:
    key: str
    prompt_id: str
    policy: str
    prompt: str
    response: str


@dataclass
class Tally:
    ok: int = 0
    errors: Counter = field(default_factory=Counter)    # failed units by error

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def score_units(stage: str, client: ApiClient, specials: frozenset[str], work: WorkFile,
                units: list[ScoringUnit], make_record: Callable[[ScoringUnit, Judgement], object],
                need_distribution: bool, tally: Tally, desc: str = "") -> None:
    """Score ``units`` (none of them done yet), append their rows to ``work`` and count them in
    ``tally``. Rows are appended in small batches and always before returning or raising, so
    finished units survive a budget stop, an API outage or Ctrl-C."""
    if not units:
        return

    def accept(reply: Reply) -> bool:
        try:
            parse_judgement(reply, need_distribution)
            return True
        except Unparsable:
            return False

    def one(unit: ScoringUnit) -> dict:
        body = client.request(judge_messages(unit.prompt, unit.response, specials))
        reply = client.call(body, accept)
        try:
            return ok_row(unit.key, make_record(unit, parse_judgement(reply, need_distribution)))
        except Unparsable as e:
            return failed_row(unit.key, f"unparsable {stage} output: {e}", raw=reply.content or "")

    if any(client.cached(client.request(judge_messages(u.prompt, u.response, specials))) is None
           for u in units):
        client.connect()   # from this (the main) thread: a local server is started only if needed
    bar = progress(stage, len(units), "call", desc)
    pending: list[dict] = []
    last_append = time.monotonic()
    try:
        for unit, result in client.run_all(units, one):
            if isinstance(result, RequestFailed):
                result = failed_row(unit.key, str(result))
            elif isinstance(result, BaseException):
                raise result
            if result["status"] == "ok":
                tally.ok += 1
            else:
                tally.errors[result["error"]] += 1
            pending.append(result)
            bar.update(1)
            if len(pending) >= _APPEND_EVERY_ROWS or time.monotonic() - last_append > _APPEND_EVERY_S:
                work.append(pending)
                pending, last_append = [], time.monotonic()
    finally:
        work.append(pending)
        bar.close()


def report(stage: str, client: ApiClient, n_todo: int, tally: Tally, seconds: float) -> None:
    c = client.counters
    asked = c.calls - c.retries
    per_call = f", {seconds / asked:.2f}s per request" if asked else ""
    print(f"[{stage}] {tally.ok} of {n_todo} units to do scored in {seconds:.1f}s"
          f"{f', {tally.failed} failed' if tally.failed else ''}: {c.calls} HTTP requests "
          f"({c.retries} retries), {c.cached} from the request cache{per_call}; ${client.spent_total:.4f} "
          f"spent over all runs (budget ${client.api.budget_usd:.2f})", file=sys.stderr)
    if tally.errors:
        print(f"[{stage}] {tally.failed} units failed: "
              + "; ".join(f"{n} x {e}" for e, n in tally.errors.most_common(5)), file=sys.stderr)


def stopped(stage: str, e: PipelineError, *works_and_keys) -> PipelineError:
    """The error that ends a stage early, saying what was kept. Arguments: work, keys, work, keys..."""
    pairs = list(zip(works_and_keys[::2], works_and_keys[1::2]))
    done = sum(w.done(k) for w, keys in pairs for k in keys)
    total = sum(len(keys) for _, keys in pairs)
    where = ", ".join(str(w.path) for w, _ in pairs)
    err = type(e)(f"stage {stage} stopped: {e}. {done} of {total} units are done and saved ({where}); "
                  "fix the cause (e.g. raise the budget) and rerun the same command to do only the rest")
    return err


def stage_inputs(ck: dict) -> dict:
    return {"input.prompts": ck["prepare"]["outputs"]["prompts.jsonl"]["sha256"],
            "input.responses": ck["generate"]["outputs"][RESPONSES]["sha256"]}


# ---- stage 3 ------------------------------------------------------------------------------

def fingerprint(config: Config, args, ck: dict) -> dict:
    return {**stage_inputs(ck), **api_keys(config, "judge"), "judge.template": TEMPLATE_DIGEST}


def run(config: Config, args, fp: dict) -> dict:
    data_dir = config.data_dir
    prompts = {p.prompt_id: p.prompt for p in load_prompts(data_dir)}
    responses = read_jsonl(data_dir / RESPONSES, Response)
    keys = [unit_key(r.prompt_id, r.policy) for r in responses]
    work = WorkFile(work_path(data_dir, "judge"), fp)
    if work.repaired_bytes:
        print(f"[judge] cut a torn last line ({work.repaired_bytes} bytes) from {work.path}")
    todo = [ScoringUnit(k, r.prompt_id, r.policy, prompts[r.prompt_id], r.response)
            for k, r in zip(keys, responses) if not work.done(k)]
    print(f"[judge] {len(keys)} responses, {len(keys) - len(todo)} already scored; judge: "
          f"{config.judge.provider} {config.judge.model}")

    def record(u: ScoringUnit, j: Judgement) -> JudgeScore:
        return JudgeScore(prompt_id=u.prompt_id, policy=u.policy, score=j.score, mean=j.mean,
                          variance=j.variance, raw=j.raw)

    started = time.monotonic()
    tally = Tally()
    try:
        with api_client(config, "judge", "judge") as (client, specials):
            try:
                score_units("judge", client, specials, work, todo, record, need_distribution=True, tally=tally)
            except (BudgetExceeded, FatalApiError) as e:
                raise stopped("judge", e, work, keys)
            finally:
                report("judge", client, len(todo), tally, time.monotonic() - started)
                usage = write_json(data_dir / JUDGE_USAGE, asdict(client.usage(tally.failed)))
        return {**finish("judge", work, {data_dir / JUDGE_SCORES: keys}), JUDGE_USAGE: usage}
    finally:
        work.close()
