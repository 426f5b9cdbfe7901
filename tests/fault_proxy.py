"""Test servers on 127.0.0.1: a fault-injecting HTTP proxy, and a scripted OpenAI-compatible server.

FaultProxy sits in front of a real server (e.g. llama_cpp.server) and answers a seeded share of
requests with a fault instead of forwarding them:

    with FaultProxy("http://127.0.0.1:8000", fail_rate=0.3, seed=1) as proxy:
        client = OpenAI(base_url=proxy.url + "/v1", ...)
        ...
        proxy.counts   # Counter: "forwarded", "429", "500", "503", "close", "hang", "requests"
        proxy.max_inflight   # the most requests it was forwarding at once

Faults: "429" (with Retry-After: 0 or 1), "500", "503", "close" (the connection is closed
without an answer), "hang" (no answer for ``hang_s`` seconds, then closed: use with a client
timeout shorter than that), and what a gateway gives in an outage: "200error" (HTTP 200 whose
body is an error object), "200empty" (HTTP 200, a completion with no choices), "403" and "404". ``fail_rate``, ``faults`` and ``pass_first`` (the first N POST
requests always pass) may be changed while it runs. Only
POST requests are faulted (GET /v1/models, the readiness probe, always passes).

ScriptedChatServer answers /v1/chat/completions itself with ``answer(body) -> str`` as the
assistant's text (with plausible logprobs), for tests of output that a real model would
rarely give (prose instead of a digit, "10", ...); an answer ``(status, message)`` is sent as
an API error instead.

Both count what they see, stop by themselves at ``close()``, and bind only 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

FAULTS = ("429", "500", "503", "close")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
                "proxy-connection", "upgrade", "te", "trailer"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Base:
    def __init__(self, port: int = 0):
        """port: 0 for any free one; a server's former port to restart it there."""
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.requests_log: list[dict] = []     # the JSON bodies of the POST requests seen
        self._closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def do_GET(self):
                outer._handle(self, "GET")

            def do_POST(self):
                outer._handle(self, "POST")

        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: Iterable = (),
              content_type: str = "application/json") -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()

    def _handle(self, h, method):   # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FaultProxy(_Base):
    def __init__(self, upstream: str, fail_rate: float = 0.3, seed: int = 0,
                 faults: Iterable[str] = FAULTS, hang_s: float = 3.0):
        u = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port
        self.fail_rate = fail_rate
        self.faults = tuple(faults)
        self.hang_s = hang_s
        self.pass_first = 0          # the first N POST requests always pass
        self.inflight = 0            # requests being forwarded now, and the most at once
        self.max_inflight = 0
        self.rng = random.Random(seed)
        super().__init__()

    def _decide(self) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.counts["requests"] <= self.pass_first:
                return None
            if self.rng.random() < self.fail_rate and self.faults:
                return self.rng.choice(self.faults)
            return None

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = self._read_body(h)
        fault = self._decide() if method == "POST" else None
        if method == "POST":
            try:
                with self.lock:
                    self.requests_log.append(json.loads(body or b"null"))
            except ValueError:
                pass
        if fault is not None:
            with self.lock:
                self.counts[fault] += 1
            if fault == "429":
                with self.lock:
                    retry_after = str(self.counts["429"] % 2)       # 1, 0, 1, ...
                self._send(h, 429, b'{"error": {"message": "rate limited (injected)"}}',
                           [("Retry-After", retry_after)])
            elif fault in ("500", "503", "403", "404"):
                self._send(h, int(fault), b'{"error": {"message": "injected failure"}}')
            elif fault == "200error":
                self._send(h, 200, b'{"error": {"message": "upstream unavailable (injected)", "code": 503}}')
            elif fault == "200empty":
                self._send(h, 200, json.dumps({"id": "chatcmpl-empty", "object": "chat.completion",
                                               "created": int(time.time()), "model": "injected",
                                               "choices": []}).encode())
            elif fault == "hang":
                self._closing.wait(self.hang_s)
                self._abort(h)
            else:   # "close"
                self._abort(h)
            return
        with self.lock:
            self.counts["forwarded"] += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            self._forward(h, method, body)
        finally:
            with self.lock:
                self.inflight -= 1

    def _forward(self, h: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_HEADERS}
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=600)
        try:
            conn.request(method, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            passed = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS
                      and k.lower() != "content-type"]
            self._send(h, resp.status, data, passed, resp.getheader("Content-Type") or "application/json")
        except OSError:
            self._abort(h)
        finally:
            conn.close()

    @staticmethod
    def _abort(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ScriptedChatServer(_Base):
    """An OpenAI-compatible chat endpoint whose answer is ``answer(request_body)``."""

    def __init__(self, answer: Callable[[dict], str], model: str = "scripted"):
        self.answer = answer
        self.model = model
        # The model its replies name, if not the one asked for: an API alias served by a dated
        # snapshot (may be changed while it runs, as an alias is updated).
        self.served_as: str | None = None
        super().__init__()

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = self._read_body(h)
        if method == "GET":
            self._send(h, 200, json.dumps({"object": "list", "data": [{"id": self.model}]}).encode())
            return
        req = json.loads(body)
        with self.lock:
            self.counts["requests"] += 1
            self.requests_log.append(req)
            auth = h.headers.get("Authorization", "")
            self.counts["auth:" + auth] += 1
        req["_authorization"] = auth
        text = self.answer(req)
        if isinstance(text, tuple):          # (status, message): an API error
            status, message = text
            self._send(h, status, json.dumps({"error": {"message": message}}).encode())
            return
        words = text.split(" ") if text else []
        tokens = [w if i == 0 else " " + w for i, w in enumerate(words)][: req.get("max_tokens") or 16]
        k = req.get("top_logprobs") or 0
        content = [{"token": t, "logprob": -0.1, "bytes": None,
                    "top_logprobs": [{"token": t, "logprob": -0.1, "bytes": None}]
                    + [{"token": f"alt{j}", "logprob": -3.0 - j, "bytes": None} for j in range(max(k - 1, 0))]}
                   for t in tokens]
        reply = {"id": f"chatcmpl-{int(time.time() * 1000)}", "object": "chat.completion",
                 "created": int(time.time()), "model": self.served_as or req.get("model", self.model),
                 "choices": [{"index": 0, "finish_reason": "length",
                              "message": {"role": "assistant", "content": "".join(tokens)},
                              "logprobs": {"content": content} if req.get("logprobs") else None}],
                 "usage": {"prompt_tokens": 50, "completion_tokens": len(tokens), "total_tokens": 50 + len(tokens)}}
        self._send(h, 200, json.dumps(reply).encode())


class RewritingProxy(FaultProxy):
    """An engine that does not sample as asked: each generation request (not a teacher-forcing
    echo) reaches the real server with ``changes`` applied (``{"top_k": 10}``: it truncates;
    ``{"stop": ["."]}``: it stops on a string, not on the model's end-of-generation tokens)."""

    def __init__(self, upstream: str, changes: dict):
        self.changes = changes
        super().__init__(upstream, fail_rate=0)

    def _forward(self, h: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        if method == "POST" and body:
            req = json.loads(body)
            if not req.get("echo") and req.get("max_tokens", 16) > 1:
                body = json.dumps({**req, **self.changes}).encode()   # its length is sent anew (a hop header)
        super()._forward(h, method, body)
