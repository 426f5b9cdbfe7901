"""Prompt sources. Each yields candidate first user turns; `sample_prompts` does the rest.

A source is a function ``(config) -> Candidates``: the rows' first user turns in source order,
with the source's own ids, and whether each row passed the source's own language field
(None where the source has none and the text must be classified).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import Config
from ..errors import InputError
from ..records import Prompt


@dataclass
class Candidates:
    source: str
    texts: list[Optional[str]]         # first user turn per row (None: the row has none)
    ids: list[str]
    language_ok: Optional[list[bool]]  # None: classify the text


def load_candidates(config: Config) -> Candidates:
    from . import arena, sharegpt
    loaders: dict[str, Callable[[Config], Candidates]] = {
        "sharegpt": sharegpt.load, "arena": arena.load}
    return loaders[config.source.type](config)


def _is_language(text: str, language: str) -> bool:
    import py3langid
    return py3langid.classify(text[:1000])[0] == language


def sample_prompts(config: Config, samples: int, seed: int,
                   too_long: Callable[[str], Optional[str]] = lambda text: None) -> tuple[list[Prompt], Counter]:
    """Seeded sample of `samples` distinct, non-empty prompts in the configured language.

    Rows are visited in one seeded permutation and checked lazily, so the cost is
    proportional to what is kept, and the first N of a larger sample are the N-sample.
    too_long(text): why the prompt does not fit a model's context, or None.
    """
    cands = load_candidates(config)
    order = list(range(len(cands.texts)))
    random.Random(seed).shuffle(order)
    kept: list[Prompt] = []
    seen_text: set[str] = set()
    seen_id: set[str] = set()
    skipped: Counter = Counter()
    for row in order:
        text = cands.texts[row]
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            skipped["no first user turn, or empty"] += 1
        elif len(text) > config.source.max_prompt_chars:
            skipped["longer than source.max_prompt_chars"] += 1
        elif text in seen_text:
            skipped["duplicate"] += 1
        elif not (cands.language_ok[row] if cands.language_ok is not None
                  else _is_language(text, config.source.language)):
            skipped[f"not language {config.source.language!r}"] += 1
        elif (reason := too_long(text)) is not None:
            skipped[reason] += 1
        else:
            seen_text.add(text)
            pid = re.sub(r"[^A-Za-z0-9_.-]", "_", str(cands.ids[row])) or f"row{row}"
            if pid in seen_id:
                pid = f"{pid}-r{row}"
            seen_id.add(pid)
            kept.append(Prompt(prompt_id=pid, prompt=text, source=cands.source,
                               source_row=row, source_id=str(cands.ids[row])))
            if len(kept) == samples:
                break
    if not kept:
        raise InputError(f"source {cands.source}: no eligible prompts among {len(cands.texts)} rows "
                         f"({dict(skipped) or 'the source is empty'})")
    if len(kept) < samples:
        raise InputError(f"source {cands.source}: only {len(kept)} eligible prompts, "
                         f"{samples} asked for (skipped: {dict(skipped)})")
    return kept, skipped
