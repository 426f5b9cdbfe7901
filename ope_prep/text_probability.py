"""A text's probability under a policy: the sum over the token sequences that spell it.

The event (events.TextEvent) is "the response is this text, and ends" or "the response begins
with these bytes". Its probability is a sum over a lattice: every token sequence whose bytes spell
the text (then the stop), or, for a prefix, spell part of it and continue with a token that
crosses its end. One tokenization's probability can be far below the text's (a word sampled in
pieces, "ma"+"ind", where the tokenizer says "main"+"d"), so both a weight's numerator and its
denominator are the text's.

The search, a beam over the lattice. Explored token sequences ("stems") form a trie; one teacher-
forcing pass over a stem reads, at each of its positions, the value of every token that continues
the text there (and of the tokens that cross its end, or of the stop), so each explored node knows
its children's values. Starting from the seeds (the tokenizer's own spelling; for the base, the
split it sampled too), each round explores the unexplored children whose share is largest (below),
each completed by the tokenizer's spelling of the rest, while a child's share is at least
`explore_share` and fewer than `beam_width` stems are explored. The event's log-probability is the log-sum-exp, over the explored
nodes, of each node's mass plus its terminal value (the stop after the whole text; for a prefix,
the tokens that cross its end, or 0 at its end): distinct token sequences, so disjoint events.

A left-out child's share is bounded, not known: its mass against the best explored mass at the
first byte at or after the child's end where an explored node ends, which is what its share there
would be if the tokens that complete it had probability 1. `dropped_bound` (the sum of these over
every left-out child, as a share of the event) bounds what the search leaves out, loosely where a
split ends inside a word: measured on the default models, the splits explored beyond the seeds
were worth far less than that bound said (benchmarks/text_event_study.txt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .events import Lattice, NoSharedEvent, TextEvent, lse


@dataclass
class TextScore:
    logprob: float                 # log P(event)
    paths: list[list[int]]         # the explored stems (the leaves of the trie), best first
    path_logprobs: list[float]     # each stem's value with its terminal (stop, crossing, or 0)
    crossing_logprob: Optional[float]   # prefix events: the crossing tokens after inner nodes (None: none)
    best_token_logprobs: list[float]    # per-token values of paths[0] (the stop's last, if it stops)
    dropped_bound: float           # bound on the share of the event's mass left out (see above)
    seed_logprobs: list[float]     # each seed's path value, in the seeds' order (the gap the search closed)


@dataclass
class _Node:
    offset: int                    # bytes of the text its tokens spell
    mass: float                    # log P(its tokens)
    children: dict[int, float] = field(default_factory=dict)   # token inside the text -> its value
    terminal: float = -math.inf    # log of the event's mass after this node (stop, crossing, or 0)
    read: bool = False


class TextSearch:
    """The beam search for one event under one policy (see the module docstring)."""

    def __init__(self, lattice: Lattice, event: TextEvent, stop_tokens: Sequence[int], seeds: list[list[int]],
                 beam_width: int, explore_share: float):
        self.lat, self.ev, self.stop_tokens = lattice, event, list(stop_tokens)
        self.width, self.min_log_share = beam_width, math.log(explore_share)
        self.seeds = [tuple(s) for s in seeds]
        self.nodes: dict[tuple[int, ...], _Node] = {(): _Node(0, 0.0)}
        self.stems: list[tuple[int, ...]] = []
        self.pending: list[tuple[int, ...]] = []
        self.queued: set[tuple[int, ...]] = set()     # children chosen, read in the next round
        for s in seeds:
            self._add(tuple(s))

    def _add(self, stem: tuple[int, ...]) -> None:
        if stem not in self.stems and self._usable(stem):
            self.stems.append(stem)
            self.pending.append(stem)

    def _usable(self, stem: tuple[int, ...]) -> bool:
        n = sum(self.lat.length(t) for t in stem)
        return n == len(self.ev.text) or not self.ev.stops

    # ---- one round ------------------------------------------------------------------------------
    def requests(self) -> list[tuple[tuple[int, ...], list[np.ndarray], Optional[list[int]]]]:
        """The pending stems as (stem, candidate ids per position, stop tokens or None)."""
        out = []
        for stem in self.pending:
            offsets = self.lat.offsets(list(stem))
            cands = [np.asarray([t for part in self._candidates(o) for t in part], dtype=np.intp) for o in offsets]
            stops = self.stop_tokens if self.ev.stops and offsets[-1] == len(self.ev.text) else None
            out.append((stem, cands, stops))
        return out

    def _candidates(self, o: int) -> tuple[list[int], list[int]]:
        """(tokens inside the text at offset o, tokens crossing its end there)."""
        text = self.ev.text
        inside = self.lat.inside(text, o)
        crossing = self.lat.crossing(text, o) if not self.ev.stops and o < len(text) else []
        return inside, crossing

    def absorb(self, stem: tuple[int, ...], values: list[np.ndarray], stop_value: Optional[float]) -> None:
        """One pending stem's readout (TeacherForcer.teacher_force_readouts)."""
        offsets = self.lat.offsets(list(stem))
        mass = 0.0
        for k, o in enumerate(offsets):
            key = stem[:k]
            node = self.nodes.setdefault(key, _Node(o, mass))
            if not node.read:
                inside, crossing = self._candidates(o)
                v = values[k]
                node.children = dict(zip(inside, v[:len(inside)].tolist()))
                if o == len(self.ev.text):
                    node.terminal = (stop_value if stop_value is not None else -math.inf) if self.ev.stops else 0.0
                elif crossing:
                    node.terminal = lse(v[len(inside):])
                node.read = True
            if k < len(stem):
                mass += node.children[stem[k]]

    def finish_round(self) -> bool:
        """Choose the next stems; False when the search is over."""
        self.pending = []
        if len(self.stems) >= self.width:
            return False
        budget = self.width - len(self.stems)
        for share, node_key, token in self._left_out():
            if budget == 0 or share < self.min_log_share:
                break
            rest = self.lat.spell(self.ev.text[self.nodes[node_key].offset + self.lat.length(token):])
            before = len(self.stems)
            self._add(node_key + (token,) + tuple(rest))
            budget -= len(self.stems) - before
            self.queued.add(node_key + (token,))
        return bool(self.pending)

    def _refs(self) -> dict[int, float]:
        """Best explored mass at each byte offset where an explored node ends."""
        best: dict[int, float] = {}
        for n in self.nodes.values():
            if n.read:
                best[n.offset] = max(best.get(n.offset, -math.inf), n.mass)
        return best

    def _left_out(self) -> list[tuple[float, tuple[int, ...], int]]:
        """Unexplored children as (log share next to the explored mass at or after their end,
        parent, token), largest first."""
        refs = self._refs()
        offs = sorted(refs)
        out = []
        for key, n in self.nodes.items():
            if not n.read:
                continue
            for tok, v in n.children.items():
                if key + (tok,) in self.nodes or key + (tok,) in self.queued:
                    continue
                end = n.offset + self.lat.length(tok)
                ref = next((refs[o] for o in offs if o >= end), None)
                if ref is not None:
                    out.append((n.mass + v - ref, key, tok))
        out.sort(key=lambda t: -t[0])
        return out

    def _dropped_bound(self) -> float:
        s = sum(math.exp(share) for share, _, _ in self._left_out())
        return s / (1.0 + s)

    # ---- the result -----------------------------------------------------------------------------
    def result(self) -> TextScore:
        read = {k: n for k, n in self.nodes.items() if n.read}
        leaves = [s for s in self.stems if s in read]
        inner = [k for k in read if k not in leaves]
        path_values = [read[s].mass + read[s].terminal for s in leaves]
        order = sorted(range(len(leaves)), key=lambda i: -path_values[i])
        inner_terms = [read[k].mass + read[k].terminal for k in inner if read[k].terminal > -math.inf]
        crossing = lse(inner_terms) if inner_terms else None
        total = lse(path_values + ([crossing] if crossing is not None else []))
        best = leaves[order[0]]
        per_token = [self.nodes[best[:k]].children[best[k]] for k in range(len(best))]
        if self.ev.stops:
            per_token.append(read[best].terminal)
        seeds = [read[s].mass + read[s].terminal if s in read else -math.inf for s in self.seeds]
        return TextScore(total, [list(leaves[i]) for i in order], [path_values[i] for i in order], crossing,
                         per_token, self._dropped_bound(), seeds)


def score_texts(model, jobs: list[tuple[list[int], float, TextSearch]]) -> list[object]:
    """Run each (prompt, temperature, search) job's beam search on `model` (its
    teacher_force_readouts), every job's round in one call: a TextScore per job, or the
    exception that stopped it."""
    out: list[object] = [None] * len(jobs)
    for j, (_, _, search) in enumerate(jobs):
        if not search.stems:
            out[j] = NoSharedEvent("this tokenizer has no spelling of the response's text (a byte without a token)")
    live = [j for j in range(len(jobs)) if out[j] is None]
    while live:
        asks = [(j, req) for j in live for req in jobs[j][2].requests()]
        results = model.teacher_force_readouts([(jobs[j][0], stem, jobs[j][1], cands, stops)
                                                for j, (stem, cands, stops) in asks])
        for (j, (stem, _, _)), res in zip(asks, results):
            if isinstance(res, Exception):
                out[j] = res
            elif out[j] is None:
                jobs[j][2].absorb(stem, *res)
        still = []
        for j in live:
            if out[j] is None and jobs[j][2].finish_round():
                still.append(j)
            elif out[j] is None:
                out[j] = jobs[j][2].result()
        live = still
    return out
