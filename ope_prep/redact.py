"""Credentials out of everything stored or shown (issue 37, item 7).

A ``base_url`` may carry a credential: ``https://user:pass@host/v1`` or ``...?key=...``. It is used
as given for requests, and `public_url` is what every fingerprint, cache identity, work-file
header, message, log and output holds instead: the same URL with the user info dropped and the
value of every credential-like query parameter replaced. So a rotated credential changes no
fingerprint either. `redact_urls` does the same to any URL inside a free text (an error message).
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "<redacted>"

# Query parameters that carry a credential (compared in lower case, with - read as _).
_SECRET_PARAMS = {"key", "api_key", "apikey", "token", "access_token", "auth", "auth_token", "password",
                  "pass", "secret", "client_secret", "sig", "signature", "code", "x_api_key"}

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def _secret_param(name: str) -> bool:
    return name.lower().replace("-", "_") in _SECRET_PARAMS


def public_url(url: Optional[str]) -> Optional[str]:
    """url without user info and with credential query values replaced (None stays None)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED          # not parseable: show nothing of it
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _secret_param(k) else v) for k, v in pairs], safe="<>")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls(text: str) -> str:
    """text with every URL in it made public (`public_url`)."""
    return _URL.sub(lambda m: public_url(m.group()) or "", text)
