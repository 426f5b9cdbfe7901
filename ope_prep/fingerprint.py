"""Fingerprints: the config keys and inputs each stage depends on, flattened so that a change
is listed key by key (`diff_keys`) when a run is refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import ApiConfig, Config, EndpointConfig

DIGEST_CACHE = Path(os.environ.get("OPE_PREP_DIGEST_CACHE",
                                   Path.home() / ".cache" / "ope_prep" / "file_digests.json"))


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts/lists -> {"a.b.0.c": value}, the form in which changed keys are listed."""
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


def diff_keys(old: dict[str, object], new: dict[str, object]) -> list[str]:
    lines = []
    for k in sorted(set(old) | set(new)):
        if old.get(k, "<unset>") != new.get(k, "<unset>"):
            lines.append(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}")
    return lines


def file_sha256(path: Path) -> str:
    """A file's sha256, remembered per (path, size, mtime) in ~/.cache/ope_prep/file_digests.json,
    so a multi-GB model is hashed once, not at every stage start."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(DIGEST_CACHE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        try:
            DIGEST_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = DIGEST_CACHE.with_name(f"{DIGEST_CACHE.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache), encoding="utf-8")
            tmp.replace(DIGEST_CACHE)
        except OSError:
            pass   # only a cache: the digest is still right
    return cache[key]


def model_identity(config: Config, model_key: str) -> dict[str, object]:
    """Everything about a model that moves a log-probability: the file's content, the context
    size and the chat template the config gives (None: the file's own, covered by its digest)."""
    p = config.model_path(model_key)
    m = config.models[model_key]
    return {"file": p.name, "sha256": file_sha256(p), "n_ctx": m.n_ctx, "chat_template": m.chat_template}


def policies_keys(config: Config) -> dict[str, object]:
    """What stages 2 and 2b depend on: every policy, its model, and llama.cpp's numeric path."""
    from .backends.llama import numeric_identity   # loads llama.cpp: only stages that run it ask
    # What a stop's log-probability is (ope_prep/events.py): work recorded under another
    # definition is not reused.
    out: dict[str, object] = {"base_policy": config.base_policy, "stop_event": "any end-of-generation token"}
    out.update(flatten(numeric_identity(), "llama_cpp."))
    for p in config.policies:
        out.update(flatten(p.model_dump(), f"policies.{p.name}."))
        out.update(flatten(model_identity(config, p.model), f"policies.{p.name}.model_file."))
        endpoint = config.models[p.model].endpoint
        if endpoint is not None:     # where it runs changes results; how fast or at what price does not
            out.update({f"policies.{p.name}.endpoint.{k}": getattr(endpoint, k)
                        for k in ("engine", "model", "teacher_force")})
    return out


def api_keys(config: Config, which: str) -> dict[str, object]:
    api: ApiConfig = getattr(config, which)
    # Throughput, timeouts and money do not change results; everything else does.
    ignore = set(EndpointConfig.model_fields) - {"base_url"}
    if api.provider == "local":     # grammar, max_tokens, top_logprobs: not used in process
        ignore |= {"grammar", "max_tokens", "top_logprobs", "base_url"}
    out = {f"{which}.{k}": v for k, v in api.model_dump().items() if k not in ignore}
    if api.provider in ("local", "local_server"):
        out.update(flatten(model_identity(config, api.model), f"{which}.model_file."))
    if api.provider == "local":
        from .backends.llama import numeric_identity   # loads llama.cpp: only when it is used
        out.update(flatten(numeric_identity(), "llama_cpp."))
    return out
