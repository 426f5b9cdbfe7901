"""Prompt sources: a weighted mix, sampled uniformly, filtered, deduplicated, with provenance.

Each source's rows are visited in one seeded permutation of its row indices (so every eligible
row has the same chance, however the file is ordered, and a smaller sample is a prefix of a
larger one), read a chunk of chosen rows at a time, and checked lazily: the cost is proportional
to what is kept, not to the source's size. The mix takes, for each next prompt, the source
furthest below its share, so every prefix of the sample holds each source's share rounded down
or up (for two sources exactly the largest-remainder counts), and a run can grow.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from ..config import Config
from ..errors import InputError
from ..records import Prompt
from .load import OpenedSource, data_file_paths, language_matches, normalized, open_source, text_digest
from .schema import SourceConfig, SourceSpec

FIRST_CHUNK, MAX_CHUNK = 256, 16384


@dataclass
class Sample:
    prompts: list[Prompt]
    counts: dict[str, int]                      # prompts per source
    skipped: dict[str, dict[str, int]]          # per source: reason -> rows passed over
    provenance: dict[str, dict]                 # per source: where, revision, rows, weight, group


def active_sources(config: Config, only: list[str], exclude: list[str]) -> list[int]:
    """Indices of the mix's sources left on by --only / --exclude (group names)."""
    groups = {s.group_name for s in config.source.mix}
    for flag, names in (("--only", only), ("--exclude", exclude)):
        for g in names:
            if g not in groups:
                raise InputError(f"{flag} {g}: no such group in source.mix (groups: {', '.join(sorted(groups))})")
    on = [i for i, s in enumerate(config.source.mix)
          if (not only or s.group_name in only) and s.group_name not in exclude]
    if not on:
        raise InputError(f"--only/--exclude leave no source on (groups: {', '.join(sorted(groups))})")
    return on


def _is_language(text: str, language: str) -> bool:
    import py3langid
    return py3langid.classify(text[:1000])[0] == language


class _Dedup:
    def __init__(self, mode: str):
        self.mode, self.exact, self.norm = mode, set(), set()

    def why_duplicate(self, text: str) -> Optional[str]:
        if text in self.exact:
            return "duplicate"
        if self.mode == "normalized" and normalized(text) in self.norm:
            return "duplicate after normalizing"
        return None

    def add(self, text: str) -> None:
        self.exact.add(text)
        if self.mode == "normalized":
            self.norm.add(normalized(text))


@dataclass
class _Stream:
    """One source's eligible prompts, in its seeded order."""
    src: OpenedSource
    seed: int
    filters: SourceConfig
    too_long: Callable[[str], Optional[str]]
    skipped: Counter = field(default_factory=Counter)
    visited: int = 0
    ids: set = field(default_factory=set)

    def __post_init__(self):
        # Seeded per source (by its name), so adding a source leaves the others' order alone.
        rng = np.random.default_rng([self.seed, zlib.crc32(self.src.label.encode())])
        self.order = rng.permutation(len(self.src))
        self.rows: Iterator = self._rows()

    def _rows(self):
        pos, chunk = 0, getattr(self.src.dataset, "first_chunk", FIRST_CHUNK)
        while pos < len(self.order):
            yield from self.src.rows(self.order[pos:pos + chunk].tolist())
            pos, chunk = pos + chunk, min(2 * chunk, MAX_CHUNK)

    def next_prompt(self, dedup: _Dedup) -> Optional[Prompt]:
        f = self.filters
        for r in self.rows:
            self.visited += 1
            text = r.text.strip() if r.text else ""
            if not text:
                why = "no first user turn, or empty"
            elif len(text) < f.min_prompt_chars:
                why = "shorter than source.min_prompt_chars"
            elif len(text) > f.max_prompt_chars:
                why = "longer than source.max_prompt_chars"
            elif f.language and not (language_matches(r.language, f.language) if r.language
                                     else _is_language(text, f.language)):
                why = f"not language {f.language!r}"
            elif f.drop_flagged and r.flagged:
                why = "flagged by the source (toxic or moderated)"
            else:
                why = dedup.why_duplicate(text) or self.too_long(text)
            if why:
                self.skipped[why] += 1
                continue
            dedup.add(text)
            pid = f"{self.src.label}-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", r.source_id) or f"row{r.row}")
            if pid in self.ids:
                pid = f"{pid}-r{r.row}"
                while pid in self.ids:      # a row whose own id is the one made here
                    pid += "_"
            self.ids.add(pid)
            return Prompt(prompt_id=pid, prompt=text, source=self.src.label, source_row=r.row,
                          source_id=r.source_id, source_revision=self.src.revision, text_digest=text_digest(text))
        return None


def next_source(k: int, weights: list[float], counts: list[int], tie_order: list[int]) -> int:
    """The source furthest below its share of the first k prompts (ties: a seeded order)."""
    return max(range(len(weights)), key=lambda i: (k * weights[i] - counts[i], -tie_order[i]))


def sample_prompts(config: Config, samples: int, seed: int, only: list[str] = (), exclude: list[str] = (),
                   too_long: Callable[[str], Optional[str]] = lambda text: None) -> Sample:
    """A seeded sample of `samples` distinct prompts from the mix's active sources.

    too_long(text): why the prompt does not fit (a model's context, a token bound), or None.
    """
    on = active_sources(config, list(only), list(exclude))
    specs: list[SourceSpec] = [config.source.mix[i] for i in on]
    files = [data_file_paths(config.source.mix[i], i, config.resolve, config.config_path) for i in on]
    streams = [_Stream(open_source(spec, i, f), seed, config.source, too_long) for spec, i, f in zip(specs, on, files)]
    total = sum(s.weight for s in specs)
    weights = [s.weight / total for s in specs]
    tie_order = list(range(len(specs)))
    random.Random(seed).shuffle(tie_order)
    counts = [0] * len(specs)
    dedup = _Dedup(config.source.dedup)
    prompts: list[Prompt] = []
    first_of: dict[str, int] = {}               # prompt id -> the stream that gave it
    for k in range(1, samples + 1):
        i = next_source(k, weights, counts, tie_order)
        prompt = streams[i].next_prompt(dedup)
        if prompt is None:
            raise InputError(_ran_out(streams[i], on[i], weights[i], k - 1, samples))
        if prompt.prompt_id in first_of:
            # config.SourceConfig refuses names that allow this; a last guard, before stage 2
            # would find two units with one key
            j = first_of[prompt.prompt_id]
            raise InputError(f"source.mix.{on[i]} ({streams[i].src.label}) and source.mix.{on[j]} "
                             f"({streams[j].src.label}) both give prompt id {prompt.prompt_id!r}; rename one "
                             f"of the sources (source.mix.<i>.name)")
        first_of[prompt.prompt_id] = i
        prompts.append(prompt)
        counts[i] += 1
    return Sample(
        prompts=prompts,
        counts={s.label: c for s, c in zip(specs, counts)},
        skipped={st.src.label: dict(st.skipped) for st in streams},
        provenance={st.src.label: {"where": st.src.where, "revision": st.src.revision, "rows": len(st.src),
                                   "rows_read": st.visited, "weight": round(w, 6), "group": sp.group_name}
                    for st, sp, w in zip(streams, specs, weights)})


def reasons_text(skipped: dict) -> str:
    return ", ".join(f"{why}: {n}" for why, n in sorted(skipped.items(), key=lambda kv: -kv[1])) or "none"


def _ran_out(stream: _Stream, index: int, weight: float, supplied: int, samples: int) -> str:
    eligible = stream.visited - sum(stream.skipped.values())
    return (f"source.mix.{index} ({stream.src.label}): all {len(stream.src)} rows read, {eligible} eligible "
            f"(passed over: {reasons_text(stream.skipped)}); at its share {weight:.3g} the mix can supply "
            f"{supplied} prompts, {samples} asked for. Ask for fewer, lower its weight, or add a source")
