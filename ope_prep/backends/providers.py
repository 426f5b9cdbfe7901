"""The one place that turns config into a model provider (stages never build one themselves).

A policy model runs in process (``models.<key>`` without ``endpoint``) or on an inference engine
(with one); `policy_model` gives either behind the same interface (``chat``, ``n_ctx_per_seq``,
``generate_iter``, ``teacher_force_many``, ``close``), so stages do not branch on where a model
runs. An engine is checked (`check_engine`) before a stage uses it. A judge or oracle is a model
in process or a client of an endpoint (`scoring_provider`: local, local_server, openai).
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Protocol, Sequence, Union

from ..config import Config
from ..errors import EngineDown, EngineRefused, FatalApiError
from ..fingerprint import model_identity
from ..records import UsageTotals
from ..redact import public_url
from .http import ApiClient
from .llama import ChatTokenizer, Generation, LlamaModel, load_tokenizer
from . import engine_canary
from .remote import EngineCheck, RemoteModel, engine_check
from .replies import RequestFailed
from .server import STARTUP_TIMEOUT_S, LlamaServer, ServedModel, vocab_texts

# The engine check's prompts: short, varied, and the same for every run (asked anew every time).
CHECK_PROMPTS = [
    "Name three colors and say what each reminds you of.",
    "How do I boil an egg?",
    "Write one sentence about the sea.",
    "What is 12 times 7? Explain briefly.",
    "Give me a tip for learning a new language.",
]
CHECK_MAX_TOKENS = 64


def local_model(config: Config, model_key: str, n_seq: int) -> LlamaModel:
    """A models.<key> GGUF in process, with up to n_seq sequences in flight."""
    m = config.models[model_key]
    return LlamaModel(config.model_path(model_key), n_ctx=m.n_ctx, n_seq=n_seq,
                      n_threads=config.generation.n_threads, chat_template=m.chat_template)


def local_tokenizer(config: Config, model_key: str) -> ChatTokenizer:
    """A models.<key> GGUF's tokenizer and chat template only (no weights)."""
    return load_tokenizer(str(config.model_path(model_key)), config.models[model_key].chat_template)


def policy_tokenizers(config: Config) -> tuple[dict[str, ChatTokenizer], dict[str, str]]:
    """Every policy model's tokenizer (vocabulary only) and its vocab_digest, by model key: what
    the scored event of a response is computed from (ope_prep/events.py)."""
    keys = dict.fromkeys(p.model for p in config.policies)
    tokenizers = {k: local_tokenizer(config, k) for k in keys}
    return tokenizers, {k: t.vocab_digest() for k, t in tokenizers.items()}


class _LocalTeacherForcer:
    """Teacher forcing in process for a model on an engine (endpoint.teacher_force false); the
    weights are loaded on the first call."""

    def __init__(self, config: Config, model_key: str, n_seq: int):
        self.config, self.model_key, self.n_seq = config, model_key, n_seq
        self.model: Optional[LlamaModel] = None

    def __call__(self, items):
        if self.model is None:
            self.model = local_model(self.config, self.model_key, self.n_seq)
        return self.model.teacher_force_many(items)

    def readouts(self, items):
        if self.model is None:
            self.model = local_model(self.config, self.model_key, self.n_seq)
        return self.model.teacher_force_readouts(items)

    def close(self) -> None:
        if self.model is not None:
            self.model.close()


class PolicyModel(Protocol):
    """What stages 2 and 2b ask of a policy model: LlamaModel (in process) and RemoteModel (on an
    engine, backends/remote.py) both answer it."""
    chat: ChatTokenizer
    n_ctx_per_seq: int

    def generate_iter(self, jobs: Iterable[tuple[list[int], float, int]], max_tokens: int
                      ) -> Iterator[tuple[int, Union[Generation, Exception]]]:
        """(job index, its Generation or why not) as each (prompt, temperature, seed) job ends."""

    def teacher_force_many(self, items: Sequence[tuple]) -> list[Union[list[float], Exception]]:
        """Per-token values of each (prompt, response, temperature[, stop_tokens]) item's response."""

    def teacher_force_readouts(self, items: Sequence[tuple]) -> list:
        """Candidate tokens' values along each (prompt, stem, temperature, candidates, stop_tokens)
        item (TeacherForcer.teacher_force_readouts): the text-event search's question."""

    def close(self) -> None: ...


def remote_model(config: Config, model_key: str, stage: str, n_seq: int = 4, base_urls: Optional[list[str]] = None,
                 local_tf: Optional[_LocalTeacherForcer] = None, check: bool = False) -> RemoteModel:
    """models.<key> on its engine: every base URL (or ``base_urls``); teacher forcing in process
    through ``local_tf`` (or a new one) when endpoint.teacher_force is false. ``check``: a client
    whose requests are never answered from an earlier run's replies (its cache file records the
    spend only)."""
    m = config.models[model_key]
    ep = m.endpoint
    assert ep is not None
    urls = base_urls or [ep.base_url, *ep.more_base_urls]
    identity = {"engine": ep.engine, "model": ep.model, **model_identity(config, model_key)}
    if check:
        identity["check"] = uuid.uuid4().hex
    name = f"{stage}_{model_key}" + ("_check" if check else "")
    client = ApiClient(ep, f"models.{model_key}.endpoint", stage, config.data_dir, lambda: urls, identity,
                       name=name, label=f"{ep.engine} engine, model {ep.model} at {', '.join(map(public_url, urls))}")
    client.connect()          # nothing to start: the base URLs are known, and set the concurrency
    if local_tf is None and not ep.teacher_force:
        local_tf = _LocalTeacherForcer(config, model_key, n_seq)
    # A text's probability needs every token's value at each position, which no engine returns:
    # its readouts run in process (the weights are loaded only if a text event asks).
    readouts = local_tf if local_tf is not None else _LocalTeacherForcer(config, model_key, n_seq)
    return RemoteModel(ep, local_tokenizer(config, model_key), m.n_ctx, client, local_teacher_force=local_tf,
                       local_readouts=readouts)


def check_engine(config: Config, model_key: str, stage: str) -> EngineCheck:
    """Trust but verify, alone (--check-providers): see `_engine_check` (it compares with the run's
    canary, if there is one, and never writes it)."""
    ep = config.models[model_key].endpoint
    local_tf = None if ep is None or ep.teacher_force else _LocalTeacherForcer(config, model_key, 4)
    try:
        return _engine_check(config, model_key, stage, local_tf, keep=False)
    finally:
        if local_tf is not None:
            local_tf.close()


def _engine_check(config: Config, model_key: str, stage: str, local_tf: Optional[_LocalTeacherForcer],
                  urls: Optional[list[str]] = None, keep: bool = False) -> EngineCheck:
    """Generation and teacher forcing of models.<key>'s engine agree on the check prompts (under
    the first policy on that model, at each temperature of the policies on it), on every replica
    (or those of ``urls``) by itself, asked anew each time (a check answered from the cache would
    pass with the server down or changed); and every replica serves what this run's first check saw
    (its fingerprint, then its check values: engine_canary.py). keep: a stage's check, which writes
    the canary when there is none yet (or it gained jobs)."""
    ep = config.models[model_key].endpoint
    assert ep is not None
    pol = next(p for p in config.policies if p.model == model_key)
    temperatures = sorted({p.temperature for p in config.policies if p.model == model_key})
    prompts = CHECK_PROMPTS[:ep.check_prompts] if ep.check_prompts <= len(CHECK_PROMPTS) else \
        [CHECK_PROMPTS[i % len(CHECK_PROMPTS)] + f" ({i})" for i in range(ep.check_prompts)]
    max_tokens = min(CHECK_MAX_TOKENS, config.generation.max_tokens)
    canary = engine_canary.load(config.data_dir, model_key)
    grew = canary is None
    remedy = engine_canary.remedy(config.data_dir, model_key) if canary else engine_canary.REPLICAS_DIFFER
    results = []
    for url in urls or [ep.base_url, *ep.more_base_urls]:
        replica = remote_model(config, model_key, stage, base_urls=[url], local_tf=local_tf, check=True)
        try:
            jobs = [(replica.chat.prompt_tokens(pol.system_prompt, text), t, config.run.seed + i)
                    for t in temperatures for i, text in enumerate(prompts)]
            result, seen = _check_one(model_key, url, replica, jobs, max_tokens, ep.check_tolerance_per_token,
                                          canary, remedy)
        finally:
            replica.client.close()     # the in-process teacher forcer is the caller's
        if seen is not None:
            if canary is None:
                canary = engine_canary.Canary.first(model_key, seen)   # the other replicas are compared with it
            else:
                grew = canary.learn(seen) or grew
        results.append((url, result))
        if not result.ok:
            break                      # refused: the other replicas need not be asked
    ok = all(r.ok for _, r in results)
    if ok and keep and grew and canary is not None:
        engine_canary.save(config.data_dir, canary)
    detail = "; ".join(f"{public_url(url)}: {r.detail}" for url, r in results if ok or not r.ok)
    return EngineCheck(model_key, ok, sum(r.tokens for _, r in results), max(r.max_diff for _, r in results),
                       detail if urls or not ep.more_base_urls else f"each replica by itself: {detail}",
                       down=all(r.down for _, r in results if not r.ok) and not ok)


def _check_one(model_key: str, url: str, replica: RemoteModel, jobs: list, max_tokens: int, tolerance: float,
                   canary: Optional[engine_canary.Canary], remedy: str
                   ) -> tuple[EngineCheck, Optional[engine_canary.Observation]]:
    """One replica: its fingerprint (refused before sampling when it differs from the canary's),
    the engine check, then its values against the canary's (a change refused with ``remedy``). The
    observation when it passed."""
    try:
        identity = replica.identity()
    except RequestFailed as e:
        return EngineCheck(model_key, False, 0, math.inf, f"a check request failed: {e}", down=not e.deterministic), None
    seen = engine_canary.Observation(public_url(url), identity, {})
    why = canary.differs(seen, tolerance) if canary is not None else None
    if why:
        return EngineCheck(model_key, False, 0, 0.0, why + remedy), None
    result = engine_check(model_key, replica, jobs, max_tokens, tolerance)
    if not result.ok:
        return result, None
    seen.samples = {engine_canary.job_key(p, t, s, max_tokens): sample for (p, t, s), sample in zip(jobs, result.samples)}
    why = canary.differs(seen, tolerance) if canary is not None else None
    if why:
        return EngineCheck(model_key, False, result.tokens, result.max_diff, why + remedy), None
    return result, seen


def policy_model(config: Config, model_key: str, n_seq: int, stage: str) -> PolicyModel:
    """models.<key> for generation or teacher forcing: in process, or on the replicas of its
    engine that pass their check (`serving_replicas`)."""
    ep = config.models[model_key].endpoint
    if ep is None:
        return local_model(config, model_key, n_seq)
    local_tf = None if ep.teacher_force else _LocalTeacherForcer(config, model_key, n_seq)
    try:
        urls = serving_replicas(config, model_key, stage, local_tf)
        return remote_model(config, model_key, stage, n_seq, base_urls=urls, local_tf=local_tf)
    except BaseException:
        if local_tf is not None:
            local_tf.close()
        raise


# An engine whose every replica is down is checked again after this, then twice as long, ...
OUTAGE_FIRST_WAIT_S = 15.0
OUTAGE_MAX_WAIT_S = 600.0


def serving_replicas(config: Config, model_key: str, stage: str,
                     local_tf: Optional[_LocalTeacherForcer]) -> list[str]:
    """The replicas of models.<key>'s engine that pass the engine check, each asked by itself.
    One that fails is dropped, with a line in the log, while the others serve. None passes: if one
    was refused for its values, EngineRefused (exit 2); if all are down (an outage), they are asked
    again with backoff for up to endpoint.outage_wait_minutes, then EngineDown (exit 3)."""
    ep = config.models[model_key].endpoint
    assert ep is not None
    deadline = time.monotonic() + ep.outage_wait_minutes * 60
    wait = OUTAGE_FIRST_WAIT_S
    while True:
        checked = [(url, _check_replica(config, model_key, stage, url, local_tf))
                   for url in [ep.base_url, *ep.more_base_urls]]
        passed = [(url, r) for url, r in checked if r.ok]
        failed = [(url, r) for url, r in checked if not r.ok]
        for url, r in (failed if passed else []):
            print(f"[{stage}] engine check: models.{model_key}.endpoint: replica {url} dropped for this stage "
                  f"({r.detail}); {len(passed)} of {len(checked)} serve", file=sys.stderr)
        if passed:
            for url, r in passed:
                print(f"[{stage}] engine check: {r.line()}" + (f" ({url})" if len(checked) > 1 else ""),
                      file=sys.stderr)
            return [url for url, _ in passed]
        refused = [(url, r) for url, r in failed if not r.down]
        if refused:
            url, r = refused[0]
            raise EngineRefused(r.line() + (f" (replica {url})" if len(checked) > 1 else ""))
        left = deadline - time.monotonic()
        what = "; ".join(f"{url}: {r.detail}" for url, r in failed)
        if left <= 0:
            raise EngineDown(f"models.{model_key}.endpoint: every replica stayed down for "
                             f"endpoint.outage_wait_minutes ({ep.outage_wait_minutes:g}): {what}; "
                             "rerun the same command once it serves (finished units are kept)")
        pause = min(wait, left)
        print(f"[{stage}] engine check: models.{model_key}.endpoint: every replica is down ({what}); "
              f"checking again in {pause:.0f}s (up to endpoint.outage_wait_minutes "
              f"{ep.outage_wait_minutes:g} in all)", file=sys.stderr)
        time.sleep(pause)
        wait = min(wait * 2, OUTAGE_MAX_WAIT_S)


def _check_replica(config: Config, model_key: str, stage: str, url: str,
                   local_tf: Optional[_LocalTeacherForcer]) -> EngineCheck:
    """The engine check of one replica (a stop such as a wrong key counts as refused)."""
    try:
        return _engine_check(config, model_key, stage, local_tf, urls=[url], keep=True)
    except FatalApiError as e:
        return EngineCheck(model_key, False, 0, float("inf"), str(e))


def model_usage(model: PolicyModel, tokens: int) -> UsageTotals:
    """What a stage spent on one model: the engine's requests and money, or tokens in process."""
    if isinstance(model, RemoteModel):
        return model.usage()
    return UsageTotals(input_tokens=tokens, notes="in process (llama.cpp)")


# ---- judge and oracle ---------------------------------------------------------------------------

@dataclass
class ScoringProvider:
    """Either a model in process, or a client of an endpoint (with the control-token texts its chat
    rendering parses, which quoted text must not spell; unknown_vocabulary: a server whose
    vocabulary is not known here, where no text of a control token's shape may pass)."""
    model: Optional[LlamaModel] = None
    client: Optional[ApiClient] = None
    specials: frozenset[str] = frozenset()
    unknown_vocabulary: bool = False


def scoring_model(config: Config, model_key: str) -> LlamaModel:
    """A judge or oracle model in process: one sequence per policy (the judge prompts of one user
    prompt share their prefix) and one for the rubric and examples every judge prompt starts with."""
    return local_model(config, model_key, n_seq=min(8, len(config.policies) + 1))


def managed_server(config: Config, model_keys: list[str], stage: str,
                   startup_timeout_s: float = STARTUP_TIMEOUT_S) -> LlamaServer:
    """A llama_cpp.server (not started) for the config's `model_keys`, its log in <data_dir>/logs."""
    models = [ServedModel(key, config.model_path(key), config.models[key].n_ctx, config.models[key].chat_template)
              for key in model_keys]
    return LlamaServer(models, config.generation.n_threads, config.data_dir / "logs", stage, startup_timeout_s)


@contextmanager
def scoring_provider(config: Config, which: str, stage: str, check: bool = False) -> Iterator[ScoringProvider]:
    """``config.<which>`` (judge or oracle) as a provider, closed on the way out. local_server gets
    a managed llama_cpp.server, started on the first request not in the cache. ``check``
    (--check-providers): a client whose requests are never answered from an earlier run's replies,
    as the engine check's (its cache file records the spend only)."""
    api = getattr(config, which)
    with ExitStack() as stack:
        if api.provider == "local":
            t = time.monotonic()
            model = scoring_model(config, api.model)
            stack.callback(model.close)
            print(f"[{stage}] {api.model} loaded in process in {time.monotonic() - t:.1f}s", file=sys.stderr)
            yield ScoringProvider(model=model)
            return
        if api.provider == "local_server":
            server = managed_server(config, [api.model], stage)
            stack.callback(server.stop)

            def connect() -> Optional[str]:
                t = time.monotonic()
                print(f"[{stage}] starting llama_cpp.server for {api.model} (log: {server.log_path})",
                      file=sys.stderr)
                server.start()
                print(f"[{stage}] server ready in {time.monotonic() - t:.1f}s", file=sys.stderr)
                return server.base_url

            identity = {"provider": "local_server", **model_identity(config, api.model)}
            specials = vocab_texts(str(config.model_path(api.model)))[2]
            endpoint = api.model_copy(update={"api_key_env": None})   # our own server needs no key
        else:
            def connect() -> Optional[str]:
                return api.base_url
            identity = {"provider": api.provider, "base_url": public_url(api.base_url)}
            specials = frozenset()
            endpoint = api
        # Only OpenAI's own API (no base_url) is known to tokenize user text as text; a self-hosted
        # server (vLLM, llama.cpp) may parse <|im_end|> in a response and let it forge a rating.
        unknown_vocabulary = api.provider != "local_server" and api.base_url is not None
        if check:
            identity["check"] = uuid.uuid4().hex
        client = ApiClient(endpoint, which, stage, config.data_dir, connect, identity,
                           label=f"provider {api.provider}, model {api.model}")
        stack.callback(client.close)
        yield ScoringProvider(client=client, specials=specials, unknown_vocabulary=unknown_vocabulary)
