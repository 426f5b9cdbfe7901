"""What the engine serves is part of the run: each replica's fingerprint (what the engine says
about itself, `Engine.read_identity`) and a canary (the engine check's sampled tokens and their
values, from the run's first check), kept in ``<data_dir>/engine_canary/<model key>.json`` and
compared on every replica at every later check.

The engine check compares a replica with itself; a model replaced under the same served name
between rounds (a new fine-tune, another quantization, an engine upgrade), or a replica of another
build behind the same list, passes it, and every record after it silently comes from another
model. The canary catches what the fingerprint does not say: the check's jobs are seeded, so the
same model on the same build samples the same tokens with the same values; where the tokens part,
only the shared prefix is compared (an engine may not reproduce a draw bit for bit), and a check
that shares no token at all with the first one is a change too.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError
from ..files import engine_canary_file
from ..store import write_json

CANARY_VERSION = 1


def job_key(prompt: Sequence[int], temperature: float, seed: int, max_tokens: int) -> str:
    """One check job (its prompt tokens, temperature, seed and length), as a canary key."""
    blob = json.dumps([list(prompt), temperature, seed, max_tokens], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Sample:
    """One check job's response as a replica returned it while sampling."""
    tokens: list[int]
    values: list[float]


@dataclass
class Observation:
    """What one replica showed at one check."""
    replica: str                  # the replica's URL without credentials (redact.public_url)
    identity: dict[str, str]      # its fingerprint (Engine.read_identity)
    samples: dict[str, Sample]    # job_key -> its response


@dataclass
class Canary:
    """The run's first engine check of one model: the replica it asked first and what it showed."""
    model_key: str
    replica: str
    checked_at: str
    identity: dict[str, str]
    samples: dict[str, Sample] = field(default_factory=dict)
    version: int = CANARY_VERSION

    @classmethod
    def first(cls, model_key: str, seen: Observation) -> "Canary":
        return cls(model_key, seen.replica, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   dict(seen.identity), dict(seen.samples))

    def differs(self, seen: Observation, tolerance: float) -> Optional[str]:
        """Why ``seen`` is not what this run's first check saw (None when it is the same)."""
        first = f"this run's first engine check ({self.replica}, {self.checked_at})"
        changed = [f"{k} {self.identity.get(k, '(none)')!r} -> {seen.identity.get(k, '(none)')!r}"
                   for k in sorted(set(self.identity) | set(seen.identity))
                   if self.identity.get(k) != seen.identity.get(k)]
        if changed:
            return f"says it serves another model or build than {first}: {'; '.join(changed)}"
        common = [(self.samples[k], s) for k, s in seen.samples.items() if k in self.samples]
        shared = [_shared(a.tokens, b.tokens) for a, b in common]
        diffs = [(abs(x - y), n) for (a, b), n in zip(common, shared) for x, y in zip(a.values[:n], b.values[:n])]
        worst = max((d for d, _ in diffs), default=0.0)
        if worst > tolerance:
            return (f"gives other log-probabilities for the same tokens than {first}: up to "
                    f"{worst:.3g} nats on a token (tolerance {tolerance:g}, {len(diffs)} tokens of {len(common)} "
                    "check responses): another model, quantization or build behind the same name")
        both = [n for (a, b), n in zip(common, shared) if a.tokens and b.tokens]
        if both and not any(both):
            return (f"samples other tokens than {first} from the first token on, with the same "
                    f"seeds, in all {len(both)} check responses: another model or build behind the same name")
        return None

    def learn(self, seen: Observation) -> bool:
        """Keep the responses of jobs the canary does not have yet (check_prompts raised);
        whether it grew."""
        new = {k: s for k, s in seen.samples.items() if k not in self.samples}
        self.samples.update(new)
        return bool(new)


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def load(data_dir: Path, model_key: str) -> Optional[Canary]:
    path = data_dir / engine_canary_file(model_key)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("version") != CANARY_VERSION or raw.get("model_key") != model_key:
            raise ValueError(f"version {raw.get('version')!r}, model {raw.get('model_key')!r}")
        samples = {k: Sample([int(t) for t in s["tokens"]], [float(v) for v in s["values"]])
                   for k, s in raw["samples"].items()}
        return Canary(model_key, str(raw["replica"]), str(raw["checked_at"]),
                      {str(k): str(v) for k, v in raw["identity"].items()}, samples)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not an engine canary of models.{model_key} ({e}); move it aside to "
                         "start the canary anew") from None


def save(data_dir: Path, canary: Canary) -> None:
    write_json(data_dir / engine_canary_file(canary.model_key), asdict(canary))


# A refusal within one check, before any canary was kept: the replicas of one model disagree.
REPLICAS_DIFFER = ". Every replica in base_url and more_base_urls must serve the same model on the same build"


def remedy(data_dir: Path, model_key: str) -> str:
    """What to do when a replica is refused for a change since the kept canary."""
    return (f". The run's records so far came from what the first check saw: serve that again, or, to go on "
            f"with the new one, move {data_dir / engine_canary_file(model_key)} aside and redo from "
            "generation (--force-step generate)")
