"""A policy model behind an OpenAI-compatible inference engine (``models.<key>.endpoint``), with
the in-process model's interface for stages 2 and 2b: ``generate_iter`` and ``teacher_force_many``.

The local GGUF file still gives the tokenizer and the chat template (``chat``): prompts are the
token ids stage 2 renders in process, and a response is split into those same token ids, so the
records and the checks are the same whichever provider made them. Both engines go through the
completions API (never chat completions: the engine's own template rendering could differ from
the one teacher forcing uses).

* ``vllm``: the prompt is sent as token ids; generated tokens come back as ids
  (``return_tokens_as_token_ids``); teacher forcing reads ``prompt_logprobs`` of the prompt and
  response sent together (its first entry is null), with ``max_tokens`` 1 (0 is rejected).
* ``llama_cpp`` (llama-cpp-python's server): the prompt is sent as text (its leading BOS text left
  out when the server adds BOS itself), and ``usage.prompt_tokens`` must equal our count; a
  response's tokens are its text's tokens under the local tokenizer, which must spell exactly
  the returned tokens; teacher forcing is ``echo`` with ``logprobs`` and ``max_tokens`` 1 (0
  means "until the context is full"): the echoed listing leaves out BOS tokens, its first value
  is null, and the one extra token it generates is absent when it is end-of-text
  (``usage.completion_tokens`` says), so values are located from the end and every token of the
  response is checked by its text.

llama-cpp-python's echo is misaligned for a prompt that does not start with the model's BOS token
(each token gets the value read from the logits after it): such a unit is refused from the prompt
alone (when the generated token is end-of-text the reply looks right). Whatever no parsing can
catch is left to the engine check (``engine_check``, on each replica, never from the cache): an
engine whose sampling values and teacher forcing disagree, that stops where the model does not, or
that truncates sampling despite the request is refused with the reason. Engines return log-probabilities at temperature 1 (raw), so the
config allows only temperature 1.0 for a policy on an endpoint, and this module checks it again.

The stop is one event (ope_prep/events.py): any of the model's end-of-generation tokens next.
A response that ended by itself gets as its last value the stop event's log-probability, the
log-sum-exp over the end-of-generation set, read by one teacher-forcing request per end token
(engines return at most the sampled token's own value). Its last token id is the stop token the
engine returned (vLLM); when the engine does not return it (llama-cpp-python's server), the id is
the template's end-of-turn token (``chat.end_of_turn``), a marker: the value is the whole set's
either way. ``teacher_force_many`` takes an item (prompt, response, temperature, stop_tokens)
whose last token is such a stop: its value is the same log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from scipy import stats

from ..config import ModelEndpoint
from .api import ApiClient, Reply, RequestFailed
from .llama.chat import ChatTokenizer
from .llama.generate import Generation

TeacherForce = Callable[[Sequence[tuple[Sequence[int], Sequence[int], float]]], list]

# Sampling parameters that leave softmax(logits / T) alone (llama.cpp's defaults would not).
_NEUTRAL = {
    "llama_cpp": {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
                  "presence_penalty": 0.0, "frequency_penalty": 0.0},
    "vllm": {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
             "frequency_penalty": 0.0, "return_tokens_as_token_ids": True, "skip_special_tokens": False},
}


class RemoteModel:
    def __init__(self, endpoint: ModelEndpoint, chat: ChatTokenizer, n_ctx: int, client: ApiClient,
                 local_teacher_force: Optional[TeacherForce] = None):
        """local_teacher_force: teacher forcing in process (endpoint.teacher_force false), used
        for the end-of-turn token's log-probability too; closed with the model if it has close()."""
        self.endpoint, self.chat, self.n_ctx_per_seq, self.client = endpoint, chat, n_ctx, client
        self._local_tf = local_teacher_force
        self._bos = chat.model.token_bos()
        self._adds_bos = chat.model.add_bos_token()

    @property
    def teacher_forces_in_process(self) -> bool:
        return self._local_tf is not None

    @property
    def local_teacher_force(self) -> Optional[TeacherForce]:
        return self._local_tf

    def close(self) -> None:
        self.client.close()
        close_local = getattr(self._local_tf, "close", None)
        if close_local is not None:
            close_local()

    # ---- requests ------------------------------------------------------------------------
    def _prompt(self, ids: Sequence[int]) -> Union[str, list[int]]:
        if self.endpoint.engine == "vllm":
            return list(ids)
        if self._adds_bos and ids and ids[0] == self._bos:
            ids = ids[1:]                      # the server puts BOS in front itself
        return self.chat.token_bytes(ids).decode("utf-8")

    def generation_body(self, prompt: Sequence[int], temperature: float, seed: int, max_tokens: int,
                        top_logprobs: int = 1) -> dict:
        return {"model": self.endpoint.model, "prompt": self._prompt(prompt), "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed, "logprobs": top_logprobs, **_NEUTRAL[self.endpoint.engine]}

    def teacher_force_body(self, tokens: Sequence[int]) -> dict:
        body = {"model": self.endpoint.model, "prompt": self._prompt(tokens), "max_tokens": 1,
                "temperature": 1.0, **_NEUTRAL[self.endpoint.engine]}
        if self.endpoint.engine == "vllm":
            body["prompt_logprobs"] = 0        # the prompt token's own log-probability only
        else:
            body.update(echo=True, logprobs=1)
        return body

    # ---- generation ------------------------------------------------------------------------
    def generate_iter(self, jobs: Iterable[tuple[list[int], float, int]], max_tokens: int
                      ) -> Iterator[tuple[int, Union[Generation, RequestFailed]]]:
        """(job index, Generation or the RequestFailed that says why not) as replies arrive,
        ``concurrency`` requests in flight per base URL."""
        def one(item):
            _, (prompt, temperature, seed) = item
            if temperature != 1.0:
                raise ValueError(f"temperature {temperature:g}: an endpoint gives log-probabilities at 1 only")
            reply = self.client.call(self.generation_body(prompt, temperature, seed, max_tokens))
            return self._generation(reply, prompt)

        for (j, _), result in self.client.run_all(enumerate(jobs), one):
            if isinstance(result, BaseException) and not isinstance(result, RequestFailed):
                raise result
            yield j, result

    def sample_as_returned(self, jobs: list[tuple[list[int], float, int]], max_tokens: int, top_logprobs: int
                           ) -> list[Union[tuple[Generation, list[dict]], RequestFailed]]:
        """For the engine check: each job's response as the engine returned it (a stop token and its
        own value only where the engine returned them; no stop event computed), with the reply's
        listing (each token's top log-probabilities)."""
        def one(item):
            _, (prompt, temperature, seed) = item
            reply = self.client.call(self.generation_body(prompt, temperature, seed, max_tokens, top_logprobs))
            return self._as_returned(reply, prompt), reply.logprobs or []

        out: list = [None] * len(jobs)
        for (j, _), result in self.client.run_all(enumerate(jobs), one):
            if isinstance(result, BaseException) and not isinstance(result, RequestFailed):
                raise result
            out[j] = result
        return out

    def _generation(self, reply: Reply, prompt: Sequence[int]) -> Generation:
        gen = self._as_returned(reply, prompt)
        if gen.finish_reason == "stop":
            ids = gen.token_ids
            if not (ids and self.chat.is_end_of_generation(ids[-1])):
                ids = ids + [self.chat.end_of_turn]          # not in the reply: a marker
            values = gen.token_logprobs[:len(ids) - 1] + [self._stop_value(prompt, ids[:-1])]
            return Generation(ids, values, "stop")
        return gen

    def _as_returned(self, reply: Reply, prompt: Sequence[int]) -> Generation:
        if reply.prompt_tokens and reply.prompt_tokens != len(prompt):
            raise RequestFailed(
                f"the engine read the prompt as {reply.prompt_tokens} tokens, not {len(prompt)}: it "
                "tokenized the text otherwise (a control token spelled in the prompt?)", certain=True)
        if reply.finish_reason not in ("stop", "length"):
            raise RequestFailed(f"finish_reason {reply.finish_reason!r}", deterministic=True)
        listing = reply.logprobs or []
        ids = self._sampled_ids(listing, reply.content or "")
        values = [e["logprob"] for e in listing]
        if any(v is None for v in values):
            raise RequestFailed("a generated token has no log-probability", deterministic=True)
        return Generation(ids, [float(v) for v in values], reply.finish_reason)

    def _stop_value(self, prompt: Sequence[int], text_ids: list[int]) -> float:
        """The stop event's log-probability after prompt + text_ids: any end token next."""
        each = [self._teacher_force_one(prompt, text_ids + [t])[-1] for t in self.chat.end_of_generation_tokens()]
        return float(np.logaddexp.reduce(each))

    def _sampled_ids(self, listing: list[dict], text: str) -> list[int]:
        tokens = [e["token"] for e in listing]
        if self.endpoint.engine == "vllm":
            try:
                return [int(t.split(":", 1)[1]) for t in tokens]
            except (IndexError, ValueError):
                raise RequestFailed("tokens are not 'token_id:N' (return_tokens_as_token_ids)", deterministic=True)
        ids = self.chat.tokenize_text(text)
        if self._pieces(ids) == tokens:
            return ids
        raise RequestFailed(
            f"the returned tokens ({len(tokens)}) are not the local tokenizer's tokens of the text "
            f"({len(ids)}): a non-canonical tokenization or a character cut in two", deterministic=True)

    def _pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.chat.piece_bytes(t).decode("utf-8", "ignore") for t in ids]

    # ---- teacher forcing ---------------------------------------------------------------------
    def teacher_force_many(self, items: Sequence[tuple[Sequence[int], Sequence[int], float]]
                           ) -> list[Union[list[float], Exception]]:
        """Per-token log-probabilities of each (prompt, response, temperature) item's response;
        or the exception that says why not (ValueError: never scorable; RequestFailed)."""
        if self._local_tf is not None:
            return self._local_tf(items)
        results: list = [None] * len(items)

        def one(i: int) -> list[float]:
            prompt, response, temperature, *rest = items[i]
            stops = bool(rest and rest[0])
            if temperature != 1.0:
                raise ValueError(f"temperature {temperature:g}: an endpoint gives log-probabilities at 1 only")
            if len(prompt) + len(response) + 1 > self.n_ctx_per_seq:
                raise ValueError(f"prompt + response of {len(prompt) + len(response)} tokens exceed the "
                                 f"context of {self.n_ctx_per_seq}")
            if not response:
                return []
            values = self._teacher_force_one(prompt, list(response))
            if stops:      # the last token is the stop: the whole end-of-generation set's value
                values[-1] = self._stop_value(prompt, list(response[:-1]))
            return values

        for i, result in self.client.run_all(range(len(items)), one):
            results[i] = result
        return results

    def _teacher_force_one(self, prompt: Sequence[int], response: list[int]) -> list[float]:
        tokens = list(prompt) + response
        if self._local_tf is not None:
            out = self._local_tf([(prompt, response, 1.0)])[0]
            if isinstance(out, Exception):
                raise out
            return out
        reply = self.client.call(self.teacher_force_body(tokens))
        if self.endpoint.engine == "vllm":
            return self._from_prompt_logprobs(reply, tokens, len(prompt))
        return self._from_echo(reply, tokens, len(response))

    def _from_prompt_logprobs(self, reply: Reply, tokens: list[int], n_prompt: int) -> list[float]:
        rows = reply.prompt_logprobs
        if rows is None or len(rows) != len(tokens):
            raise RequestFailed(f"prompt_logprobs has {len(rows) if rows is not None else 'no'} entries "
                                f"for {len(tokens)} tokens", deterministic=True)
        out = []
        for pos in range(n_prompt, len(tokens)):
            row = rows[pos] or {}
            entry = row.get(str(tokens[pos]), row.get(tokens[pos]))
            if entry is None:
                raise RequestFailed(f"prompt_logprobs at position {pos} has no entry for token {tokens[pos]}",
                                    deterministic=True)
            out.append(float(entry["logprob"] if isinstance(entry, dict) else entry))
        return out

    def _from_echo(self, reply: Reply, tokens: list[int], n_response: int) -> list[float]:
        listing = reply.logprobs or []
        extra = reply.completion_tokens          # the generated token, absent when it was end-of-text
        response = tokens[len(tokens) - n_response:]
        if self._bos in response:
            raise RequestFailed("the response holds the BOS token, which the echo listing leaves out",
                                certain=True)
        starts_with_bos = tokens[0] == self._bos
        shown = [t for t in (tokens[1:] if starts_with_bos else tokens) if t != self._bos]
        if not starts_with_bos:
            # llama-cpp-python 0.3 pairs the listed tokens with the logits rows from the first one on
            # once no BOS was cut from the front: each token gets the value read from the logits
            # *after* it. When the generated token is end-of-text, nothing in the reply shows it (the
            # count is right), so the prompt alone decides.
            raise RequestFailed("the echo is misaligned: its values are read one position late (llama-cpp-"
                                "python's echo, for a prompt that does not start with the model's BOS "
                                "token)", certain=True)
        if len(listing) - extra != len(shown):
            raise RequestFailed(f"the echo lists {len(listing) - extra} tokens, not {len(shown)}: the "
                                "engine tokenized the text otherwise", certain=True)
        part = listing[len(shown) - n_response:len(shown)]
        # llama-cpp-python shows a control token (the end of turn) as ""
        spelled = [e["token"] in (piece, "" if not self.chat.is_text_token(t) else piece)
                   for e, t, piece in zip(part, response, self._pieces(response))]
        if not all(spelled):
            raise RequestFailed(f"the echoed tokens do not spell the response's tokens (token "
                                f"{spelled.index(False)} of {len(response)})", certain=True)
        values = [e["logprob"] for e in part]
        if any(v is None for v in values):
            raise RequestFailed("the echo has no log-probability for a response token", deterministic=True)
        return [float(v) for v in values]

    def usage(self):
        return self.client.usage(0)


# ---- trust but verify ---------------------------------------------------------------------------

@dataclass
class EngineCheck:
    model_key: str
    ok: bool
    tokens: int               # tokens compared
    max_diff: float           # largest |generation - teacher forcing| per token
    detail: str

    def line(self) -> str:
        verdict = "ok" if self.ok else "REFUSED"
        return f"models.{self.model_key}.endpoint: {verdict}: {self.detail}"


# Top log-probabilities asked per generated token in the check (vLLM's default max_logprobs).
CHECK_TOP_LOGPROBS = 20
# A sampling test fails at this p-value: a false refusal once in a million checks.
SAMPLING_P_VALUE = 1e-6
def engine_check(model_key: str, model: RemoteModel, jobs: list[tuple[list[int], float, int]],
                 max_tokens: int, tolerance: float) -> EngineCheck:
    """Sample a response per job on the engine (one replica: ``model`` has one base URL, and its
    client does not answer from an earlier run's cache), then three tests:

    * each token's log-probability as the engine returned it while sampling equals its teacher-forced
      value (on the engine, or in process when endpoint.teacher_force is false); a stop token counts
      only where the engine returned it with its own value (else that value would be compared with
      itself);
    * the engine ends responses where the model would (`_stops_plausible`);
    * the engine samples from the whole distribution: tokens outside each position's top 20 turn up
      as often as the mass there says (a Poisson-binomial test), so a server that truncates (top-p,
      top-k, min-p) despite the request, or samples hotter, is refused.
    Any failure refuses the engine, with what it looks like."""
    where = "in process" if model.teacher_forces_in_process else "on the engine"
    hint = (f". Its log-probabilities would give wrong weights; set models.{model_key}.endpoint.teacher_force: "
            "false to teacher-force in process from models.{model_key}.path, or fix the engine").replace(
                "{model_key}", model_key)
    sampled = model.sample_as_returned(jobs, max_tokens, CHECK_TOP_LOGPROBS)
    failed = [g for g in sampled if isinstance(g, Exception)]
    if failed:
        return EngineCheck(model_key, False, 0, math.inf, f"a check request failed: {failed[0]}")
    gens = [g for g, _ in sampled]
    tf = model.teacher_force_many([(p, g.token_ids, t) for (p, t, _), g in zip(jobs, gens)])
    bad = [v for v in tf if isinstance(v, Exception)]
    if bad:
        return EngineCheck(model_key, False, 0, math.inf, f"teacher forcing ({where}) failed: {bad[0]}{hint}")
    diffs = [abs(a - b) for g, values in zip(gens, tf) for a, b in zip(g.token_logprobs, values)]
    worst = max(diffs, default=0.0)
    if worst > tolerance:
        return EngineCheck(model_key, False, len(diffs), worst,
                           f"generation and teacher forcing ({where}) disagree by up to {worst:.3g} nats on a "
                           f"token (tolerance {tolerance:g}, {len(diffs)} tokens){hint}")
    tests = [(True, f"{len(jobs)} responses, {len(diffs)} tokens: generation and teacher forcing ({where}) "
                    f"agree within {worst:.2g} per token (tolerance {tolerance:g})"),
             _stops_plausible(model, jobs, gens),
             sampling_test([e for _, listing in sampled for e in listing], CHECK_TOP_LOGPROBS)]
    # what failed first, then what passed
    detail = "; ".join(d for ok, d in tests if not ok) or "; ".join(d for _, d in tests)
    if not all(ok for ok, _ in tests):
        detail += " (" + "; ".join(d for ok, d in tests if ok) + ")"
    return EngineCheck(model_key, all(ok for ok, _ in tests), len(diffs), worst, detail)


def _stops_plausible(model: RemoteModel, jobs: list, gens: list[Generation]) -> tuple[bool, str]:
    """The engine stops where the model ends: for each response that ended by itself, q = the stop
    event's probability there (any end-of-generation token next). Under the model, a response of
    n tokens stops at a position with probability <= q there with chance at most (n + 1) q: that
    bounds each stop's p-value; Fisher's method combines them, refused at SAMPLING_P_VALUE."""
    stops = model.chat.end_of_generation_tokens()
    ended = [(p, t, [i for i in g.token_ids if not model.chat.is_end_of_generation(i)])
             for (p, t, _), g in zip(jobs, gens) if g.finish_reason == "stop"]
    if not ended:
        return True, "no response ended by itself (stops not tested)"
    values = model.teacher_force_many([(p, text + [stops[0]], t, stops) for p, t, text in ended])
    bad = [v for v in values if isinstance(v, Exception)]
    if bad:
        return False, f"the stop event could not be teacher-forced: {bad[0]}"
    logq = [v[-1] for v in values]
    log_p = [min(0.0, math.log(len(text) + 1) + lq) for (_, _, text), lq in zip(ended, logq)]
    p_value = float(stats.chi2.sf(-2 * sum(log_p), 2 * len(log_p)))
    figures = f"{len(ended)} stops, the least likely {min(logq):.1f} nats (P = {p_value:.2g})"
    if p_value < SAMPLING_P_VALUE:
        return False, (f"the engine ends responses where the model does not: {figures}; it stops on something "
                       "other than the model's end-of-generation tokens (a stop string or stop token set on the "
                       "server?)")
    return True, f"{figures}: ends where the model ends"


def sampling_test(listing: list[dict], k: int) -> tuple[bool, str]:
    """Whether sampled tokens fall outside each position's top k as often as the model's own
    distribution says. Per position: tail = 1 - (mass of the top k), outside = the sampled token's
    log-probability is below the k-th largest. Under sampling from the whole distribution at the
    temperature asked, the count outside is a sum of Bernoulli(tail); the test is exact
    (Poisson-binomial), two-sided at SAMPLING_P_VALUE."""
    tails, outside = [], 0
    for entry in listing:
        top = sorted((float(v) for _, v in entry.get("top") or [] if v is not None), reverse=True)[:k]
        if len(top) < k or entry.get("logprob") is None:
            continue
        tails.append(min(1.0, max(0.0, 1.0 - float(np.exp(top).sum()))))
        outside += entry["logprob"] < top[-1] - 1e-9
    expected = float(sum(tails))
    if not tails:
        return True, "sampling truncation not tested (the engine returned no top log-probabilities)"
    if expected < 3:
        return True, (f"sampling truncation not testable ({len(tails)} tokens, only {expected:.1f} expected "
                      f"outside the top {k})")
    pmf = np.zeros(len(tails) + 1)
    pmf[0] = 1.0
    for q in tails:                 # the distribution of the count, one position at a time
        pmf[1:] = pmf[1:] * (1 - q) + pmf[:-1] * q
        pmf[0] *= 1 - q
    below, above = float(pmf[:outside + 1].sum()), float(pmf[outside:].sum())
    figures = (f"{outside} of {len(tails)} sampled tokens outside the top {k}, {expected:.1f} expected "
               f"(P(<= {outside}) = {below:.2g}, P(>= {outside}) = {above:.2g})")
    if below < SAMPLING_P_VALUE:
        return False, (f"the engine truncates sampling despite the request (top-p, top-k or min-p "
                       f"on the server?): {figures}; its responses are not drawn from the probabilities recorded")
    if above < SAMPLING_P_VALUE:
        return False, (f"the engine samples more widely than the model at this temperature (a "
                       f"temperature above it, or penalties?): {figures}")
    return True, f"sampling from the whole distribution: {figures}"
