"""A managed `llama_cpp.server` on 127.0.0.1 for the judge and the oracle.

    with managed_server(config, ["smollm2_135m"], stage="judge") as server:   # providers.py
        client = OpenAI(base_url=server.base_url, ...)

The server runs as a subprocess in its own process group (so a Ctrl-C in the terminal reaches
only the stage, which then stops the server itself), on a free port, with one entry per model in
a `--config_file` JSON, through `ope_prep.backends.serve` (llama.cpp's one numeric path, so
that scores do not depend on request order): ``model_alias`` is the key of ``models`` in the config, ``logits_all`` is
on (log-probabilities need it), ``n_ctx`` comes from the config, ``n_threads`` from
``generation.n_threads``. A model whose config sets ``chat_template`` gets that template through
llama_cpp's ``hf-tokenizer-config`` chat format (the GGUF file may carry none, and llama_cpp
would then fall back to Llama-2's format). The server is waited on until ``/v1/models`` answers
and is stopped on exit, also on an error or Ctrl-C (SIGTERM to its group, then SIGKILL); on Linux,
when started from the main thread, it also gets SIGTERM if the stage process dies without
cleaning up (kill -9).

Its log goes to ``<data_dir>/logs/server_<stage>.log``; the JSON config written beside it holds
no secret (the local server needs no key).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import EXIT_UNITS_FAILED, PipelineError

STARTUP_TIMEOUT_S = 300.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never through HTTP_PROXY
STOP_TIMEOUT_S = 10.0

# Put first in a model's template: llama_cpp's hf-tokenizer-config formatter appends an empty
# assistant message instead of passing add_generation_prompt; turn that back into a generation
# prompt so the rendering is exactly the one the generation stage uses.
_GENERATION_PROMPT_SHIM = (
    "{%- if messages and messages[-1]['role'] == 'assistant' and not messages[-1]['content'] -%}"
    "{%- set messages = messages[:-1] -%}{%- set add_generation_prompt = true -%}"
    "{%- endif -%}")


class ServerError(PipelineError):
    """The local model server would not start or died; nothing was lost, rerun to resume."""

    exit_code = EXIT_UNITS_FAILED


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=8)
def vocab_texts(model_path: str) -> tuple[str, str, frozenset[str]]:
    """BOS text, EOS text and the control-token texts (<|im_end|>, <start_of_turn>, ...) of a
    GGUF file, read from its vocabulary only (no weights loaded)."""
    import llama_cpp

    from .llama.chat import load_vocab

    model = load_vocab(model_path)
    try:
        def piece(tok: int) -> str:
            return model.token_to_piece(tok, special=True).rstrip(b"\0").decode("utf-8", "replace")
        control = frozenset(
            t for t in (piece(i) for i in range(model.n_vocab())
                        if llama_cpp.llama_vocab_get_attr(model.vocab, i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)
            if t)
        return piece(model.token_bos()), piece(model.token_eos()), control
    finally:
        model.close()


def _server_env() -> dict[str, str]:
    """The environment for the server: without API keys, and without the variables that
    llama_cpp.server's settings would read (HOST, PORT, MODEL, API_KEY, CONFIG_FILE, ...),
    so that nothing in the caller's environment changes the server behind our back."""
    from llama_cpp.server.settings import ConfigFileSettings, ModelSettings

    settings_names = {n.lower() for n in (*ConfigFileSettings.model_fields, *ModelSettings.model_fields)}
    settings_names |= {"config_file", "host", "port"}
    env = {}
    for k, v in os.environ.items():
        lk = k.lower()
        if lk in settings_names or "api_key" in lk or "secret" in lk or "token" in lk:
            continue
        env[k] = v
    # the entry point is ope_prep.backends.serve, whatever the stage's working directory
    project = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project, env.get("PYTHONPATH")) if p)
    return env


def _die_with_parent() -> None:   # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass(frozen=True)
class ServedModel:
    """One model the server serves, under its config key."""
    key: str
    path: Path
    n_ctx: int
    chat_template: Optional[str] = None     # the config's; None: the GGUF file's own


class LlamaServer:
    """A llama_cpp.server subprocess serving `models` under their own keys, its log and JSON config
    in `log_dir`."""

    def __init__(self, models: list[ServedModel], n_threads: int, log_dir: Path, stage: str,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.models = list({m.key: m for m in models}.values())
        self.model_keys = [m.key for m in self.models]
        self.n_threads = n_threads
        self.stage = stage
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = log_dir
        self.log_path = self.log_dir / f"server_{stage}.log"
        self.config_path = self.log_dir / f"server_{stage}.json"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- config -----------------------------------------------------------------------
    def _model_entry(self, m: ServedModel) -> dict:
        entry = {"model": str(m.path), "model_alias": m.key, "logits_all": True, "n_ctx": m.n_ctx,
                 "n_threads": self.n_threads, "n_threads_batch": self.n_threads,
                 "n_batch": 512, "flash_attn": False, "verbose": False}
        if m.chat_template:
            bos, eos, _ = vocab_texts(str(m.path))
            tok_cfg = self.log_dir / f"server_{self.stage}_{m.key}_tokenizer_config.json"
            tok_cfg.write_text(json.dumps({"chat_template": _GENERATION_PROMPT_SHIM + m.chat_template,
                                           "bos_token": bos, "eos_token": eos}), encoding="utf-8")
            entry.update(chat_format="hf-tokenizer-config", hf_tokenizer_config_path=str(tok_cfg))
        return entry

    def _write_config(self) -> None:
        self.port = free_port()
        cfg = {"host": "127.0.0.1", "port": self.port,
               "models": [self._model_entry(m) for m in self.models]}
        self.config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "LlamaServer":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):   # another process may take the free port before the server binds it
            self._write_config()
            with open(self.log_path, "ab") as log:
                log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting llama_cpp.server "
                          f"on 127.0.0.1:{self.port} for {', '.join(self.model_keys)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "ope_prep.backends.serve", "--config_file", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=_server_env(), start_new_session=True,
                    # the death signal follows the *thread* that started the server: only the
                    # main thread lives as long as the stage
                    preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None)
            try:
                self._wait_ready()
                return self
            except ServerError:
                retry = "address already in use" in self._log_tail(20).lower() and attempt < 2
                self.stop()
                if not retry:
                    raise
        raise AssertionError("unreachable")

    def _log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = deque(f, maxlen=n)
        except OSError:
            return ""
        return "".join(line.decode("utf-8", "replace") for line in lines)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.base_url}/models"
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(
                    f"llama_cpp.server for {', '.join(self.model_keys)} exited with code {code} while "
                    f"starting; last lines of {self.log_path}:\n{self._log_tail()}")
            try:
                with _DIRECT.open(url, timeout=5) as r:
                    served = {m["id"] for m in json.load(r)["data"]}
                if set(self.model_keys) <= served:
                    return
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"llama_cpp.server did not answer on {url} within {self.startup_timeout_s:.0f}s; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}")
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        else:
            try:   # the leader is gone; make sure nothing of its group is left
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
