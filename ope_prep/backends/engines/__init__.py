"""The inference engines a policy model can be served by (``models.<key>.endpoint.engine``): one
module per engine, each one `Engine` subclass (its requests and how to read the replies), and
this registry, the one place that maps engine names to them. A new engine is one module and one
entry here.
"""

from __future__ import annotations

from .base import Engine, Sampled
from .llama_cpp_python import LlamaCppPython
from .llama_server import LlamaServer
from .sglang import Sglang
from .tgi import Tgi
from .vllm import Vllm

ENGINES: dict[str, type[Engine]] = {e.name: e for e in (LlamaCppPython, LlamaServer, Vllm, Sglang, Tgi)}
ENGINES["llama_cpp"] = LlamaCppPython      # the name from before there were several llama.cpp engines


def engine_type(name: str) -> type[Engine]:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"engine {name!r} is not one of {', '.join(ENGINES)}") from None


__all__ = ["ENGINES", "Engine", "Sampled", "engine_type"]
