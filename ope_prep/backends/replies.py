"""What a request to an endpoint is and what comes back, whoever sends it: the `Reply` records
the stages read, a `NativeRequest` to an engine's own route, and `RequestFailed`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union


class RequestFailed(Exception):
    """One request failed for good (after its retries, or not retryable); the unit fails.
    deterministic: the endpoint refused this request itself (a 4xx such as a context too long
    or a content filter), so asking again would fail the same way; otherwise (timeouts, 5xx,
    connection errors) a later run retries it. certain: it cannot succeed (quarantined at once)."""

    def __init__(self, message: str, deterministic: bool = False, certain: bool = False):
        super().__init__(message)
        self.deterministic = deterministic or certain
        self.certain = certain


@dataclass
class Reply:
    """The parts of a (chat) completion that the stages use (compact, JSON-ready)."""

    content: Optional[str]              # the message, or a completion's text
    finish_reason: Optional[str]
    logprobs: Optional[list[dict]]      # [{"token", "logprob", "top": [[token, logprob], ...]}]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: Optional[str] = None
    # vLLM's completions extension: per prompt token, None or {token id: {"logprob", ...}}
    prompt_logprobs: Optional[list] = None
    raw: Optional[dict] = None          # a native route's reply (NativeRequest), as the engine sent it
    cached: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict, cached: bool = False) -> "Reply":
        return cls(**d, cached=cached)


@dataclass(frozen=True)
class NativeRequest:
    """A request to an engine's own route under its base URL (llama-server's /completion, SGLang's
    and TGI's /generate) rather than the OpenAI API. The engine says what it costs at most and how
    its reply counts tokens, since the body's keys are the engine's own."""
    route: str
    body: dict
    prompt_tokens: int
    max_tokens: int
    token_counts: Callable[[dict], tuple[int, int]]    # reply -> (prompt tokens, completion tokens)

    def key(self) -> dict:
        return {"route": self.route, "body": self.body}


Request = Union[dict, NativeRequest]


def reply_from_openai(completion) -> Reply:
    """The compact Reply of an openai (chat) completion object."""
    usage = completion.usage
    if not completion.choices:
        return Reply(content=None, finish_reason=None, logprobs=None, model=completion.model,
                     prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0))
    choice = completion.choices[0]
    lps = None
    if hasattr(choice, "message"):          # chat: logprobs.content
        content = choice.message.content
        if choice.logprobs is not None and choice.logprobs.content is not None:
            lps = [{"token": t.token, "logprob": t.logprob,
                    "top": [[x.token, x.logprob] for x in (t.top_logprobs or [])]}
                   for t in choice.logprobs.content]
    else:                                   # completions: parallel lists tokens / token_logprobs
        content = choice.text
        if choice.logprobs is not None and choice.logprobs.tokens is not None:
            tops = choice.logprobs.top_logprobs or []
            lps = [{"token": t, "logprob": lp, "top": [[k, v] for k, v in (tops[i] or {}).items()] if i < len(tops) else []}
                   for i, (t, lp) in enumerate(zip(choice.logprobs.tokens, choice.logprobs.token_logprobs or []))]
    extra = getattr(choice, "model_extra", None) or {}
    return Reply(content=content, finish_reason=choice.finish_reason, logprobs=lps,
                 prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                 completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                 model=completion.model, prompt_logprobs=extra.get("prompt_logprobs"))


def body_problem(created) -> Optional[str]:
    """Why an HTTP 200 is not a reply (an error object for a body, no completion in it), or None:
    a gateway or engine in trouble answers so, and such a body must never be cached as a reply.
    ``created``: an openai (chat) completion, or the Reply of a native route (its ``raw``)."""
    body = created.raw if isinstance(created, Reply) else (getattr(created, "model_extra", None) or {})
    error = body.get("error") if isinstance(body, dict) else None
    if error:
        message = error.get("message", error) if isinstance(error, dict) else error
        return f"HTTP 200 with an error for a body: {str(message)[:300]}"
    if not isinstance(created, Reply) and not getattr(created, "choices", None):
        return "HTTP 200 with no completion in its body (no choices)"
    return None
