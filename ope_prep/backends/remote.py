"""A policy model behind an inference engine (``models.<key>.endpoint``), with the in-process
model's interface for stages 2 and 2b: ``generate_iter`` and ``teacher_force_many``.

The local GGUF file still gives the tokenizer and the chat template (``chat``): prompts are the
token ids stage 2 renders in process, and a response is split into those same token ids, so the
records and the checks are the same whichever provider made them. Each engine's wire format is its
module in backends/engines/ (the registry); this module decides, once for all engines, what the
values mean.

Whatever no parsing can catch is left to the engine check (``engine_check``, on each replica,
never from the cache, at each temperature a policy on the model uses): an engine whose sampling
values and teacher forcing disagree, that stops where the model does not, or that truncates
sampling despite the request is refused with the reason.

Temperature: values returned while sampling are after temperature where the engine can give them
so (not llama-cpp-python's server: its policies need temperature 1.0); prompt log-probabilities
are the raw logits' on every engine, so a policy at another temperature is teacher-forced in
process (endpoint.teacher_force false). The config refuses the rest up front; this module checks
again.

The stop is one event (ope_prep/events.py): any of the model's end-of-generation tokens next.
A response that ended by itself gets as its last value the stop event's log-probability, the
log-sum-exp over the end-of-generation set: in process in one pass, or on the engine by one
teacher-forcing request per end token (engines return at most the sampled token's own value). Its
last token id is the stop token the engine returned (vLLM, llama-server); when the engine does
not return it (llama-cpp-python's server), the id is the template's end-of-turn token
(``chat.end_of_turn``), a marker: the value is the whole set's either way. ``teacher_force_many``
takes an item (prompt, response, temperature, stop_tokens) whose last token is such a stop: its
value is the same log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from scipy import stats

from ..config import ModelEndpoint
from .http import ApiClient
from .engine_canary import Sample
from .replies import RequestFailed
from .engines import Sampled, engine_type
from .llama.chat import ChatTokenizer
from .llama.generate import Generation

TeacherForce = Callable[[Sequence[tuple]], list]


class RemoteModel:
    def __init__(self, endpoint: ModelEndpoint, chat: ChatTokenizer, n_ctx: int, client: ApiClient,
                 local_teacher_force: Optional[TeacherForce] = None, local_readouts=None):
        """local_teacher_force: teacher forcing in process (endpoint.teacher_force false), used
        for the stop event's log-probability too; closed with the model if it has close()."""
        self.endpoint, self.chat, self.n_ctx_per_seq, self.client = endpoint, chat, n_ctx, client
        self.engine = engine_type(endpoint.engine)(chat, endpoint.model)
        self._local_tf = local_teacher_force
        self._readouts = local_readouts     # in process: the text-event search's readouts
        if local_teacher_force is None and self.engine.no_teacher_forcing:
            raise ValueError(f"{self.engine.no_teacher_forcing}: teacher forcing must run in process")

    @property
    def teacher_forces_in_process(self) -> bool:
        return self._local_tf is not None

    @property
    def local_teacher_force(self) -> Optional[TeacherForce]:
        return self._local_tf

    def close(self) -> None:
        self.client.close()
        for local in {id(x): x for x in (self._local_tf, self._readouts) if x is not None}.values():
            close_local = getattr(local, "close", None)
            if close_local is not None:
                close_local()

    def teacher_force_readouts(self, items: Sequence[tuple]) -> list:
        """The text-event search's readouts, in process: an engine returns at most a few top
        values per position, not every token that continues a text."""
        if self._readouts is None:
            why = ValueError("a text's probability under another tokenizer needs every token's value at each "
                             "position, which the engine does not return, and no model file to read them in process")
            return [why] * len(items)
        return self._readouts.readouts(items)

    def _refuse_temperature(self, temperature: float, teacher_forcing: bool) -> None:
        if temperature == 1.0:
            return
        if not teacher_forcing and self.engine.no_temperature:
            raise ValueError(f"temperature {temperature:g}: {self.engine.no_temperature}")
        if teacher_forcing and self._local_tf is None:
            raise ValueError(f"temperature {temperature:g}: engines return prompt log-probabilities at "
                             "temperature 1 only (teacher-force in process: endpoint.teacher_force false)")

    # ---- generation ------------------------------------------------------------------------
    def _sample(self, prompt: Sequence[int], temperature: float, seed: int, max_tokens: int,
                top_logprobs: int) -> Sampled:
        self._refuse_temperature(temperature, teacher_forcing=False)
        request = self.engine.generation_request(prompt, temperature, seed, max_tokens, top_logprobs)
        return self.engine.read_generation(self.client.call(request), prompt)

    def generate_iter(self, jobs: Iterable[tuple[list[int], float, int]], max_tokens: int
                      ) -> Iterator[tuple[int, Union[Generation, RequestFailed]]]:
        """(job index, Generation or the RequestFailed that says why not) as replies arrive,
        ``concurrency`` requests in flight per base URL."""
        def one(item):
            _, (prompt, temperature, seed) = item
            return self._generation(self._sample(prompt, temperature, seed, max_tokens, 1), prompt, temperature)

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
            s = self._sample(prompt, temperature, seed, max_tokens, top_logprobs)
            return Generation(s.token_ids, s.token_logprobs, s.finish_reason), s.listing

        out: list = [None] * len(jobs)
        for (j, _), result in self.client.run_all(enumerate(jobs), one):
            if isinstance(result, BaseException) and not isinstance(result, RequestFailed):
                raise result
            out[j] = result
        return out

    def _generation(self, s: Sampled, prompt: Sequence[int], temperature: float) -> Generation:
        if s.finish_reason != "stop":
            return Generation(s.token_ids, s.token_logprobs, s.finish_reason)
        ids = s.token_ids
        if not (ids and self.chat.is_end_of_generation(ids[-1])):
            ids = ids + [self.chat.end_of_turn]          # not in the reply: a marker
        values = s.token_logprobs[:len(ids) - 1] + [self._stop_value(prompt, ids[:-1], temperature)]
        return Generation(ids, values, "stop")

    def _stop_value(self, prompt: Sequence[int], text_ids: list[int], temperature: float) -> float:
        """The stop event's log-probability after prompt + text_ids: any end token next."""
        stops = self.chat.end_of_generation_tokens()
        if self._local_tf is not None:
            out = self._local_tf([(prompt, text_ids + [stops[0]], temperature, stops)])[0]
            if isinstance(out, Exception):
                raise out
            return float(out[-1])
        each = [self._teacher_force_one(prompt, text_ids + [t], temperature)[-1] for t in stops]
        return stop_value_of(each, self.endpoint.check_tolerance_per_token)

    # ---- teacher forcing ---------------------------------------------------------------------
    def teacher_force_many(self, items: Sequence[tuple]) -> list[Union[list[float], Exception]]:
        """Per-token log-probabilities of each (prompt, response, temperature[, stop_tokens]) item's
        response; or the exception that says why not (ValueError: never scorable; RequestFailed)."""
        if self._local_tf is not None:
            return self._local_tf(items)
        results: list = [None] * len(items)

        def one(i: int) -> list[float]:
            prompt, response, temperature, *rest = items[i]
            stops = bool(rest and rest[0])
            if len(prompt) + len(response) + 1 > self.n_ctx_per_seq:
                raise ValueError(f"prompt + response of {len(prompt) + len(response)} tokens exceed the "
                                 f"context of {self.n_ctx_per_seq}")
            if not response:
                return []
            values = self._teacher_force_one(prompt, list(response), temperature)
            if stops:      # the last token is the stop: the whole end-of-generation set's value
                values[-1] = self._stop_value(prompt, list(response[:-1]), temperature)
            return values

        for i, result in self.client.run_all(range(len(items)), one):
            results[i] = result
        return results

    def _teacher_force_one(self, prompt: Sequence[int], response: list[int], temperature: float) -> list[float]:
        self._refuse_temperature(temperature, teacher_forcing=True)
        tokens = list(prompt) + response
        reply = self.client.call(self.engine.teacher_force_request(tokens))
        return self.engine.read_teacher_force(reply, tokens, len(response))

    def usage(self):
        return self.client.usage(0)

    def identity(self) -> dict[str, str]:
        """What the engine says it serves (Engine.read_identity), asked anew; a model with one base
        URL (the engine check's replica). A route the engine does not serve is recorded as such."""
        (raw,) = self.client.describe(self.engine.identity_route)
        if raw is None:
            return {self.engine.identity_route: "not served"}
        return self.engine.read_identity(raw)


def stop_value_of(each: Sequence[float], tolerance: float) -> float:
    """The stop event's log-probability from an engine's values of its end tokens, one request
    each: at most 0, as a probability is. Separate requests' float32 rounding can put the sum a
    hair above 1 when the end tokens hold nearly all the mass; that is the event "certain" (0.0).
    Above 0 by more than the engine check's tolerance, the values are no distribution: a
    RequestFailed (the unit is retried, then quarantined with this reason), never a record that
    stage 5 would find malformed on every rerun."""
    values = [float(v) for v in each]
    total = math.nan if any(map(math.isnan, values)) else float(np.logaddexp.reduce(values))
    if math.isnan(total) or total > tolerance:
        raise RequestFailed(f"the engine's end-of-generation log-probabilities {values} "
                            f"sum to {total:.3g}, above 0 by more than the tolerance {tolerance:g}: not a "
                            "probability", deterministic=True)
    return min(total, 0.0)


# ---- trust but verify ---------------------------------------------------------------------------

@dataclass
class EngineCheck:
    model_key: str
    ok: bool
    tokens: int               # tokens compared
    max_diff: float           # largest |generation - teacher forcing| per token
    detail: str
    down: bool = False        # not refused for its values: its check requests failed as an outage does
    # each job's response as the engine returned it while sampling (for the canary, engine_canary.py)
    samples: list[Sample] = field(default_factory=list)

    def line(self) -> str:
        verdict = "ok" if self.ok else "REFUSED"
        return f"models.{self.model_key}.endpoint: {verdict}: {self.detail}"


# Top log-probabilities asked per generated token in the check (vLLM's default max_logprobs), or the
# engine's most (Engine.max_top_logprobs).
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
    if model.teacher_forces_in_process:
        hint = (". Its log-probabilities would give wrong weights; serve the model with the pipeline's numeric "
                "settings (README: engines) or fix the engine")
    else:
        hint = (f". Its log-probabilities would give wrong weights; set models.{model_key}.endpoint.teacher_force: "
                f"false to teacher-force in process from models.{model_key}.path, or fix the engine")
    top = min(CHECK_TOP_LOGPROBS, model.engine.max_top_logprobs)
    sampled = model.sample_as_returned(jobs, max_tokens, top)
    failed = [g for g in sampled if isinstance(g, Exception)]
    if failed:
        return EngineCheck(model_key, False, 0, math.inf, f"a check request failed: {failed[0]}",
                           down=all(not f.deterministic for f in failed))
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
             sampling_test([e for _, listing in sampled for e in listing], top)]
    # what failed first, then what passed
    detail = "; ".join(d for ok, d in tests if not ok) or "; ".join(d for _, d in tests)
    if not all(ok for ok, _ in tests):
        detail += " (" + "; ".join(d for ok, d in tests if ok) + ")"
    return EngineCheck(model_key, all(ok for ok, _ in tests), len(diffs), worst, detail,
                       samples=[Sample(list(g.token_ids), list(g.token_logprobs)) for g in gens])


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
