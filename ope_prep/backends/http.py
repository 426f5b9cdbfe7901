"""One small client for any OpenAI-compatible endpoint (OpenAI, Fireworks, vLLM, llama.cpp):
chat completions (judge, oracle) and completions (policies on an engine, backends/remote.py).

What it adds around the `openai` package:

* retries with tenacity: exponential backoff with jitter, ``Retry-After`` honoured on 429,
  retried on 408/429/500/502/503/504, connection errors and timeouts, up to ``max_attempts``
  (403 and 404 too, which a gateway gives for a moment: they stop the stage if they last);
  a 200 whose body is an error object or holds no completion (a gateway in an outage) is
  retried too, and is never cached: it is not a reply (`_EmptyReply`);
  the package's own retries are off (``max_retries=0``) so that this is the only retry loop;
* concurrency: ``concurrency`` worker threads per base URL, under a rate limit of
  ``requests_per_minute`` (every attempt counts); with several base URLs (replicas of one model)
  each request goes to the one with the fewest requests in flight;
* a request cache: the sha256 of the request JSON (plus the endpoint's identity) -> the reply,
  appended to ``<data_dir>/cache/<name>_api_cache.jsonl`` (a store.WorkFile: fsynced, a torn
  last line is cut off, a torn header rewritten keeping every reply) as soon as it arrives, so a
  rerun or a resumed run pays nothing twice. A forced redo of a stage (``--force``) moves its
  caches aside with its work (`supersede_caches`), so it asks again; the spend is carried over.
  A reply the caller cannot use (``accept`` returns False) is written too, for the spend
  ledger, but is never served from the cache: that unit is asked again on the next run;
* usage and money: calls, cache hits, tokens, dollars from the per-1k prices; every paid reply
  is in the cache file, so the spend over all runs in this data dir is known on start. Before
  each request, its worst-case cost is reserved against ``budget_usd``; a request that could
  exceed the budget is not sent (BudgetExceeded), and the stage ends cleanly.

The API key is read only from ``os.environ[api_key_env]`` (a dummy when api_key_env is None, for
a server of your own), is never logged or stored, and is scrubbed from error texts before they
are shown or recorded. A base URL on this machine (127.0.0.1, localhost) is reached directly,
whatever HTTP(S)_PROXY says.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union
from urllib.parse import urlparse

import openai
import tenacity

from ..config import EndpointConfig
from ..errors import BudgetExceeded, FatalApiError, PipelineError
from ..records import UsageTotals
from ..store import WorkFile, failed_row, ok_row
from ..redact import redact_urls
from .replies import NativeRequest, Reply, Request, RequestFailed, body_problem, reply_from_openai
from .request_cache import CACHE_VERSION, ledger_total

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}            # a wrong key, no access, no such model: stop the stage
# ... but a gateway also answers 403 or 404 for a moment (a replica restarting behind it, a route
# being deployed): those are asked again, with backoff, and stop the stage only if they last
# through every attempt. A 401 (a wrong key) stops it at once.
PASSING_FATAL_STATUS = {403, 404}
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_RETRY_AFTER_S = 120.0
LOCAL_DUMMY_KEY = "sk-local-no-key"
# Worst-case prompt tokens per UTF-8 byte before any reply has told us the real ratio
# (English is about 0.25); the largest ratio seen so far is used afterwards, with a margin.
_INITIAL_TOKENS_PER_BYTE = 0.5
_MESSAGE_OVERHEAD_TOKENS = 8


class _Stopped(Exception):
    pass


class _EmptyReply(Exception):
    """HTTP 200 but no reply: an error object for a body, or no completion in it. Transient (a
    gateway or an engine in trouble answers so), so it is retried and never cached."""


def is_local(url: Optional[str]) -> bool:
    return bool(url) and urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


@dataclass
class _Counters:
    calls: int = 0            # HTTP requests sent (every attempt)
    cached: int = 0           # requests answered from the cache
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    retries: int = 0          # attempts after a retryable error
    unusable: int = 0         # replies the caller could not use


class ApiClient:
    """(Chat) completions through the `openai` client, with retries, rate limit, cache and budget.

    A request body with ``messages`` goes to chat completions, one with ``prompt`` to completions;
    keys the `openai` package does not know (llama.cpp's grammar and top_k, vLLM's
    prompt_logprobs) go in ``extra_body``. ``connect`` gives the base URL(s); it is called on the
    first request that is not in the cache (so a local server is started only when something has
    to be asked). ``identity`` is what, besides the request, decides the reply (the model file, the
    engine); it is part of the cache key. ``name`` names the cache file (one per stage and model).
    """

    def __init__(self, api: EndpointConfig, which: str, stage: str, data_dir: Path,
                 connect: Callable[[], Union[str, list[str], None]], identity: dict,
                 name: Optional[str] = None, label: str = ""):
        self.api = api
        self.which = which      # the config key, for messages: judge, models.<key>.endpoint
        self.label = label or which
        self.stage = stage
        self.identity = identity
        self._connect = connect
        self._clients: Optional[list[openai.OpenAI]] = None
        self._inflight: list[int] = []       # requests in flight per client
        self._lock = threading.Lock()
        self._stop = threading.Event()      # interrupted: no retries, no new requests
        self._halted = threading.Event()    # budget or fatal error: no new requests
        self.counters = _Counters()
        if api.api_key_env is None:
            self._key = LOCAL_DUMMY_KEY
        else:
            key = os.environ.get(api.api_key_env)
            if not key:
                raise PipelineError(f"{which}.api_key_env: environment variable {api.api_key_env} "
                                    "is not set (the API key is read only from there)")
            self._key = key
        self.cache_path = data_dir / "cache" / f"{name or stage}_api_cache.jsonl"
        # Each line is keyed by its own request, so a torn header is rewritten keeping them all.
        self._cache = WorkFile(self.cache_path, {"cache": CACHE_VERSION, "stage": stage}, self_keyed=True)
        if self._cache.repaired_bytes:
            print(f"[{stage}] cut a torn last line ({self._cache.repaired_bytes} bytes) from {self.cache_path}")
        self.spent_before = self._ledger_total()   # dollars paid by earlier runs in this data dir
        self._reserved = 0.0
        self._tokens_per_byte: Optional[float] = None   # the largest ratio seen in a reply
        self._next_slot = 0.0
        self._interval = 60.0 / api.requests_per_minute

    @property
    def concurrency(self) -> int:
        """Requests in flight: ``concurrency`` per base URL (known once connected)."""
        return self.api.concurrency * max(1, len(self._clients or [None]))

    # ---- requests and the cache ------------------------------------------------------
    def cache_key(self, body: Request) -> str:
        request = body.key() if isinstance(body, NativeRequest) else body
        blob = json.dumps({"identity": self.identity, "request": request}, sort_keys=True,
                          ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def cached(self, body: Request) -> Optional[Reply]:
        with self._lock:
            row = self._cache.results.get(self.cache_key(body))
        if row is not None and row["status"] == "ok":
            return Reply.from_json(row["record"]["reply"], cached=True)
        return None

    def _ledger_total(self) -> float:
        return ledger_total(self.cache_path)

    # ---- money ---------------------------------------------------------------------
    def _estimate_usd(self, body: Request) -> tuple[float, int]:
        if isinstance(body, NativeRequest):
            return self.api.usd(body.prompt_tokens, body.max_tokens), 0
        if isinstance(body.get("prompt"), list):     # token ids: exactly that many prompt tokens
            return self.api.usd(len(body["prompt"]), body["max_tokens"]), 0
        texts = [m["content"] for m in body["messages"]] if "messages" in body else [body["prompt"]]
        nbytes = sum(len(json.dumps(t, ensure_ascii=False).encode()) for t in texts)
        ratio = self._tokens_per_byte * 1.25 if self._tokens_per_byte else _INITIAL_TOKENS_PER_BYTE
        tokens = nbytes * ratio + _MESSAGE_OVERHEAD_TOKENS * (len(texts) + 1)
        return self.api.usd(tokens, body["max_tokens"]), nbytes

    @property
    def spent_total(self) -> float:
        return self.spent_before + self.counters.usd

    def _reserve(self, est: float) -> None:
        with self._lock:
            if est > 0 and self.spent_total + self._reserved + est > self.api.budget_usd:
                raise BudgetExceeded(
                    f"{self.which}.budget_usd ${self.api.budget_usd:.4f} would be exceeded by the next "
                    f"request (spent ${self.spent_total:.4f} over all runs in this data dir, "
                    f"${self._reserved:.4f} in flight, next request up to ${est:.4f}); no new requests "
                    f"were sent")
            self._reserved += est

    def _release(self, est: float) -> None:
        with self._lock:
            self._reserved -= est

    # ---- sending -------------------------------------------------------------------
    def _openai(self) -> list[openai.OpenAI]:
        with self._lock:
            if self._clients is None:
                urls = self._connect()
                urls = urls if isinstance(urls, list) else [urls]
                self._clients = [openai.OpenAI(
                    base_url=url, api_key=self._key, max_retries=0, timeout=self.api.timeout_s,
                    http_client=openai.DefaultHttpxClient(trust_env=False) if is_local(url) else None)
                    for url in urls]
                self._inflight = [0] * len(urls)
            return self._clients

    def connect(self) -> None:
        """Connect now (for a local server: start it) rather than on the first request, which
        may come from a worker thread; the stages call this from the main thread."""
        self._openai()

    def _create(self, body: Request):
        """Send one request to the least busy base URL."""
        clients = self._openai()
        with self._lock:
            i = min(range(len(clients)), key=lambda c: self._inflight[c])
            self._inflight[i] += 1
            self.counters.calls += 1
        if isinstance(body, NativeRequest):
            try:
                raw = clients[i].post(body.route, body=body.body, cast_to=object)
            finally:
                with self._lock:
                    self._inflight[i] -= 1
            if not isinstance(raw, dict):
                raise RequestFailed(f"{body.route}: the reply is not a JSON object", deterministic=True)
            prompt_tokens, completion_tokens = body.token_counts(raw)
            return Reply(content=None, finish_reason=None, logprobs=None, prompt_tokens=prompt_tokens,
                         completion_tokens=completion_tokens, raw=raw)
        known = _CHAT_KEYS if "messages" in body else _COMPLETION_KEYS
        params = {k: v for k, v in body.items() if k in known}
        extra = {k: v for k, v in body.items() if k not in known} or None
        try:
            if "messages" in body:
                return clients[i].chat.completions.create(**params, extra_body=extra)
            return clients[i].completions.create(**params, extra_body=extra)
        finally:
            with self._lock:
                self._inflight[i] -= 1

    def _rate_limit(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
        if slot > now and self._stop.wait(slot - now):
            raise _Stopped()

    def _send(self, body: Request) -> Reply:
        if self._stop.is_set() or self._halted.is_set():
            raise _Stopped()
        est, nbytes = self._estimate_usd(body)
        self._reserve(est)
        try:
            self._rate_limit()
            created = self._create(body)
            problem = body_problem(created)
            if problem:
                raise _EmptyReply(problem)
            reply = created if isinstance(created, Reply) else reply_from_openai(created)
        except BaseException:
            self._release(est)
            raise
        with self._lock:   # the reservation becomes the real cost in one step
            self._reserved -= est
            if reply.prompt_tokens and nbytes:
                self._tokens_per_byte = max(self._tokens_per_byte or 0.0, reply.prompt_tokens / nbytes)
            self.counters.input_tokens += reply.prompt_tokens
            self.counters.output_tokens += reply.completion_tokens
            self.counters.usd += self.api.usd(reply.prompt_tokens, reply.completion_tokens)
        return reply

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception()
        retry_after = _retry_after(exc)
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
        return tenacity.wait_exponential_jitter(initial=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S,
                                                jitter=BACKOFF_INITIAL_S)(state)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped()

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        with self._lock:
            self.counters.retries += 1

    def call(self, body: Request, accept: Callable[[Reply], bool] = lambda r: True) -> Reply:
        """The reply to ``body`` (an OpenAI API body, or a NativeRequest): from the cache, or asked
        (with retries) and then cached.

        Raises RequestFailed when the request failed for good, BudgetExceeded or FatalApiError
        when the stage must stop.
        """
        hit = self.cached(body)
        if hit is not None:
            with self._lock:
                self.counters.cached += 1
            return hit
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.api.max_attempts),
            wait=self._wait, sleep=self._sleep, before_sleep=self._before_sleep,
            retry=tenacity.retry_if_exception(_retryable), reraise=True)
        try:
            reply = retrying(self._send, body)
        except _Stopped:
            raise
        except BudgetExceeded:
            self._halted.set()
            raise
        except openai.APIStatusError as e:
            msg = self.redact(_describe(e))
            if e.status_code in FATAL_STATUS:
                self._halted.set()
                tries = f" after {self.api.max_attempts} attempts" if e.status_code in PASSING_FATAL_STATUS else ""
                raise FatalApiError(f"{self.which}: {msg}{tries}; stopping (every request would fail the same way)")
            if e.status_code in RETRY_STATUS:
                raise RequestFailed(f"{msg} after {self.api.max_attempts} attempts")
            raise RequestFailed(msg, deterministic=True)
        except openai.APIConnectionError as e:
            raise RequestFailed(f"{self.redact(_describe(e))} after {self.api.max_attempts} attempts")
        except _EmptyReply as e:
            raise RequestFailed(f"{self.redact(str(e))} after {self.api.max_attempts} attempts")
        except openai.OpenAIError as e:
            raise RequestFailed(self.redact(_describe(e)))
        usable = accept(reply)
        usd = self.api.usd(reply.prompt_tokens, reply.completion_tokens)
        key = self.cache_key(body)
        with self._lock:
            if usable:
                row = ok_row(key, {"reply": reply.to_json(), "usd": usd})
            else:
                self.counters.unusable += 1
                row = failed_row(key, "unusable reply", reply=reply.to_json(), usd=usd)
            if not self._cache.done(key):
                self._cache.append([row])
        return reply

    def describe(self, route: str) -> list[Optional[object]]:
        """GET ``route`` under each base URL: what an engine says it serves (engine_canary.py);
        None where the route is not there (404, 405: an older build, a gateway). Never cached (asked
        anew each time), retried as requests are; RequestFailed when it fails otherwise."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.api.max_attempts), wait=self._wait, sleep=self._sleep,
            before_sleep=self._before_sleep, retry=tenacity.retry_if_exception(_retryable), reraise=True)

        def get(client: openai.OpenAI) -> Optional[object]:
            try:
                return retrying(client.get, route, cast_to=object)
            except openai.APIStatusError as e:
                if e.status_code in (404, 405):
                    return None
                raise RequestFailed(f"GET {route}: {self.redact(_describe(e))}") from None
            except openai.OpenAIError as e:
                raise RequestFailed(f"GET {route}: {self.redact(_describe(e))}") from None
        return [get(client) for client in self._openai()]

    def redact(self, text: str) -> str:
        """An error text without the API key (also without key-like strings an API may echo, and
        without a URL's credentials: redact.py)."""
        if self._key and self._key != LOCAL_DUMMY_KEY:
            text = text.replace(self._key, "<redacted>")
        text = redact_urls(text)
        return re.sub(r"\b(sk|key|fw)[-_][A-Za-z0-9_\-*]{6,}", r"\1-<redacted>", text)

    # ---- many requests ---------------------------------------------------------------
    def run_all(self, items: Iterable, fn: Callable) -> Iterator[tuple[object, object]]:
        """``fn(item)`` for every item on ``concurrency`` threads; yields (item, result or the
        exception it raised) as they finish. BudgetExceeded or FatalApiError from any item stops
        new submissions; the ones in flight finish and are yielded, then the error is raised."""
        items = iter(items)
        halt: Optional[BaseException] = None
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"{self.stage}-api")
        inflight: dict[Future, object] = {}
        try:
            while True:
                while halt is None and len(inflight) < 2 * self.concurrency:
                    item = next(items, _END)
                    if item is _END:
                        break
                    inflight[pool.submit(fn, item)] = item
                if not inflight:
                    break
                finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in finished:
                    item = inflight.pop(fut)
                    exc = fut.exception()
                    if isinstance(exc, (BudgetExceeded, FatalApiError)):
                        halt = halt or exc
                        continue
                    if isinstance(exc, _Stopped):
                        continue
                    yield item, (exc if exc is not None else fut.result())
            if halt is not None:
                raise halt
        finally:
            if inflight:           # interrupted: no retries, no new requests, do not wait long
                self._stop.set()
                pool.shutdown(wait=False, cancel_futures=True)
            else:
                pool.shutdown(wait=True)

    def usage(self, failures: int) -> UsageTotals:
        c = self.counters
        notes = (f"{self.label}; this run: {c.calls} HTTP requests "
                 f"({c.retries} retries), {c.cached} answered from the cache, {c.unusable} unusable "
                 f"replies; spent over all runs in this data dir: ${self.spent_total:.6f} of budget "
                 f"${self.api.budget_usd:.4f}")
        return UsageTotals(calls=c.calls, cached=c.cached, input_tokens=c.input_tokens,
                           output_tokens=c.output_tokens, usd=round(c.usd, 8), failures=failures,
                           notes=notes)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            clients, self._clients = self._clients, None
            self._cache.close()
        for client in clients or []:
            client.close()


_END = object()
_CHAT_KEYS = {"model", "messages", "temperature", "top_p", "max_tokens", "logprobs", "top_logprobs", "seed",
              "stop", "n", "presence_penalty", "frequency_penalty", "logit_bias"}
_COMPLETION_KEYS = {"model", "prompt", "temperature", "top_p", "max_tokens", "logprobs", "echo", "seed", "stop",
                    "n", "presence_penalty", "frequency_penalty", "logit_bias"}


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APIConnectionError, _EmptyReply)):   # a timeout too; a 200 that is no reply
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code in RETRY_STATUS | PASSING_FATAL_STATUS


def _retry_after(exc: BaseException) -> Optional[float]:
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    ms = headers.get("retry-after-ms")
    try:
        if ms is not None:
            return float(ms) / 1000.0
        value = headers.get("retry-after")
        return float(value) if value is not None else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc.message)[:300]}"
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return f"connection error ({type(cause).__name__ if cause else 'no detail'})"
    return f"{type(exc).__name__}: {str(exc)[:300]}"
