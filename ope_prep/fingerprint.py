"""Fingerprints: the config keys and inputs each stage depends on, flattened so that a change
is listed key by key (store.diff_keys) when a run is refused."""

from __future__ import annotations

from .config import ApiConfig, Config, EndpointConfig
from .digests import file_sha256
from .redact import public_url


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
    if api.kind.in_process:     # grammar, max_tokens, top_logprobs: not used in process
        ignore |= {"grammar", "max_tokens", "top_logprobs", "base_url"}
    out = {f"{which}.{k}": v for k, v in api.model_dump().items() if k not in ignore}
    if f"{which}.base_url" in out:     # where it is, not the credential a URL may carry
        out[f"{which}.base_url"] = public_url(out[f"{which}.base_url"])
    if api.kind.uses_model_file:
        out.update(flatten(model_identity(config, api.model), f"{which}.model_file."))
    if api.kind.in_process:
        from .backends.llama import numeric_identity   # loads llama.cpp: only when it is used
        out.update(flatten(numeric_identity(), "llama_cpp."))
    return out
