"""The scorers of stages 3 and 4: one judge prompt in, one `Judgement` (or a `Failure`) out.

``provider: local`` scores in process on the same llama.cpp engine as stages 2 and 2b
(`LocalScorer`): it prefills each judge prompt, takes the logits at the answer position only
and reads every digit's probability from them: no sampling, no grammar, no unparsable answer.
Units go in prompt order, so the judge prompts of one user prompt (its policies' responses)
share their prefix, decoded once. Scores do not depend on batching or order (one numeric path;
tests). ``local_server`` and ``openai`` go through the openai client (`ApiScorer`): the digit
answered at temperature 0, the distribution from ``top_logprobs`` (a digit outside them counts
as 0); an answer that cannot be read is a failed unit with the judge's text. Which provider a role
uses is decided in providers.py (`scoring_provider`), not here.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from ..config import ApiConfig, Config
from ..errors import PipelineError
from ..judging import Judgement, Unparsable, judge_messages, judgement_from, parse_judgement
from ..records import UsageTotals
from ..rubrics import RUBRICS, Rubric
from .http import ApiClient
from .replies import Reply, RequestFailed
from .llama import LlamaModel
from .providers import scoring_provider

# ---- units and their tally ------------------------------------------------------------------

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


@dataclass
class Failure:
    reason: str
    deterministic: bool  # it would likely fail the same way again (see store.WorkFile)
    raw: str = ""        # the judge's text, when it answered something unreadable
    certain: bool = False  # it will fail the same way again: quarantined at once


Outcome = Union[Judgement, Failure]


# ---- scorers --------------------------------------------------------------------------------

class LocalScorer:
    """A models.<key> GGUF in process: each judge prompt prefilled, the logits at its answer
    position read over every digit token."""

    # Units scored per call, then saved together: a kill loses at most these. The rubric and
    # examples (about 1,000 tokens) are decoded once and kept between calls; a call decodes the
    # prompts (each once for its policies' responses) and the responses.
    _UNITS_PER_CALL = 8
    save_every = 1           # rows appended as soon as they are yielded (a call yields them at once)

    def __init__(self, model: LlamaModel, rubric: Rubric, run_seed: int):
        self.model = model
        self.rubric, self.run_seed = rubric, run_seed
        digits = self.model.chat.digit_tokens()
        self.candidates = [t for d in range(rubric.lo, rubric.hi + 1) for t in digits[d]]
        self.digit_of = [d for d in range(rubric.lo, rubric.hi + 1) for _ in digits[d]]
        missing = [d for d in range(rubric.lo, rubric.hi + 1) if not digits[d]]
        if missing:
            raise PipelineError(f"{self.model.chat.path}: no token spells the digit(s) {missing}")
        self.tokens_done = 0
        self.answered_by = Path(self.model.chat.path).name    # the judge's model, as a score names it

    def close(self) -> None:
        self.model.close()

    def prompt_tokens(self, unit: ScoringUnit) -> list[int]:
        return self.model.chat.chat_tokens(judge_messages(self.rubric, unit.prompt, unit.response, self.run_seed))

    def score(self, units: list[ScoringUnit]) -> Iterator[tuple[ScoringUnit, Outcome]]:
        for a in range(0, len(units), self._UNITS_PER_CALL):
            chunk = units[a:a + self._UNITS_PER_CALL]
            prompts = [self.prompt_tokens(u) for u in chunk]
            for unit, tokens, values in zip(chunk, prompts, self.model.answer_logprobs_many(prompts, self.candidates)):
                if isinstance(values, Exception):      # too long for the context
                    yield unit, Failure(str(values), deterministic=True, certain=True)
                    continue
                self.tokens_done += len(tokens)
                by_digit: dict[int, float] = {}
                for d, lp in zip(self.digit_of, values):
                    by_digit[d] = float(np.logaddexp(by_digit.get(d, -math.inf), float(lp)))
                yield unit, replace(judgement_from(self.rubric, by_digit), model=self.answered_by)

    def usage(self, failures: int) -> UsageTotals:
        return UsageTotals(input_tokens=self.tokens_done, failures=failures,
                           notes=f"in process (llama.cpp), {self.tokens_done} prompt tokens this run")

    def summary(self, n_todo: int, tally: Tally, seconds: float) -> str:
        rate = f", {self.tokens_done / seconds:.0f} prompt tokens/s" if seconds > 0 and self.tokens_done else ""
        return f"{tally.ok} of {n_todo} units to do scored in process in {seconds:.1f}s{rate}"


class ApiScorer:
    """A model behind an OpenAI-compatible endpoint (a managed llama_cpp.server, or an API),
    through ApiClient: cache, retries, concurrency, budget."""

    save_every = 32          # rows appended per batch (or every 2 s), as replies stream in

    def __init__(self, stage: str, api: ApiConfig, client: ApiClient, specials: frozenset[str], rubric: Rubric,
                 run_seed: int, need_distribution: bool, unknown_vocabulary: bool = False):
        self.stage, self.api = stage, api
        self.client, self.specials, self.rubric, self.run_seed = client, specials, rubric, run_seed
        self.need_distribution, self.unknown_vocabulary = need_distribution, unknown_vocabulary

    def close(self) -> None:
        self.client.close()

    def body(self, unit: ScoringUnit) -> dict:
        """Temperature 0, one short answer, log-probabilities of its tokens; with a grammar, the
        answer is one digit of the scale."""
        body = {"model": self.api.model, "temperature": 0, "max_tokens": self.api.max_tokens,
                "logprobs": True, "top_logprobs": self.api.top_logprobs,
                "messages": judge_messages(self.rubric, unit.prompt, unit.response, self.run_seed, self.specials,
                                           self.unknown_vocabulary)}
        if self.api.grammar:
            # llama.cpp's own request field: for the local server, or an "openai" provider whose
            # base_url is a llama.cpp server; OpenAI's API itself would reject it.
            if not self.api.takes_grammar:
                raise PipelineError(f"{self.client.which}.grammar: OpenAI's API takes no grammar; set it "
                                    "only for a llama.cpp server (local_server, or a base_url)")
            body["grammar"] = f"root ::= [{self.rubric.lo}-{self.rubric.hi}]"
        return body

    def score(self, units: list[ScoringUnit]) -> Iterator[tuple[ScoringUnit, Outcome]]:
        def accept(reply: Reply) -> bool:
            try:
                parse_judgement(self.rubric, reply, self.need_distribution)
                return True
            except Unparsable:
                return False

        def one(unit: ScoringUnit) -> Outcome:
            reply = self.client.call(self.body(unit), accept)
            try:
                return replace(parse_judgement(self.rubric, reply, self.need_distribution), model=reply.model)
            except Unparsable as e:
                return Failure(f"unparsable {self.stage} output: {e}", True, reply.content or "")

        if any(self.client.cached(self.body(u)) is None for u in units):
            self.client.connect()   # from this (the main) thread: a local server starts only if needed
        for unit, result in self.client.run_all(units, one):
            if isinstance(result, RequestFailed):
                result = Failure(str(result), result.deterministic)
            elif isinstance(result, BaseException):
                raise result
            yield unit, result

    def usage(self, failures: int) -> UsageTotals:
        return self.client.usage(failures)

    def summary(self, n_todo: int, tally: Tally, seconds: float) -> str:
        c = self.client.counters
        asked = c.calls - c.retries
        per_call = f", {seconds / asked:.2f}s per request" if asked else ""
        return (f"{tally.ok} of {n_todo} units to do scored in {seconds:.1f}s: {c.calls} HTTP requests "
                f"({c.retries} retries), {c.cached} from the request cache{per_call}; "
                f"${self.client.spent_total:.4f} spent over all runs (budget ${self.client.api.budget_usd:.2f})")


Scorer = Union[LocalScorer, ApiScorer]


@contextmanager
def open_scorer(config: Config, which: str, stage: str, run_seed: int,
                need_distribution: bool, check: bool = False) -> Iterator[Scorer]:
    """The scorer for ``config.<which>`` (judge or oracle), on the provider the config names
    (backends/providers.py: in process, or a client of an endpoint); ``check``: asked anew, never
    answered from the cache (--check-providers)."""
    api = getattr(config, which)
    rubric = RUBRICS[api.rubric]
    with scoring_provider(config, which, stage, check) as provider:
        if provider.model is not None:
            scorer: Scorer = LocalScorer(provider.model, rubric, run_seed)
        else:
            scorer = ApiScorer(stage, api, provider.client, provider.specials, rubric, run_seed, need_distribution,
                               provider.unknown_vocabulary)
        yield scorer

