"""Teacher forcing: the log-probability of given tokens from raw logits, many sequences packed
into each llama_decode batch, logits only where they predict a response token."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from .engine import _GRAIN, _MIN_SHARED, Engine, PromptTooLong, _common_prefix

# A prefix common to every sequence of a call is kept in a sequence of its own from this length
# on (a copy per group costs about as much as decoding a few tokens).
_MIN_COMMON = 64
from .sampling import candidate_logprobs, log_softmax, stop_logprob, token_logprobs


@dataclass
class _TFSeq:
    """One distinct (prompt, response) token sequence to teacher-force."""
    tokens: list[int]
    n_prompt: int
    requests: list[tuple[int, float]] = field(default_factory=list)   # (item index, temperature)
    values: dict[float, np.ndarray] = field(default_factory=dict)     # temperature -> per token
    # Set for a next-token readout (answer_logprobs_many): the candidate ids whose log softmax
    # at the prompt's last position is wanted; `tokens` then ends with one placeholder token.
    readout: Optional[np.ndarray] = None
    answer: Optional[np.ndarray] = None
    # Set when the response's last token is a stop: its value is the stop event's (any of these
    # tokens next, sampling.stop_logprob), not that one token's.
    stop_tokens: Optional[tuple[int, ...]] = None
    # Set for a candidates readout (teacher_force_readouts): the ids whose values are wanted at
    # each position after the prompt (len(tokens) - n_prompt of them, the placeholder's included),
    # and the stop set whose event value is wanted after the last response token.
    candidates: Optional[list[np.ndarray]] = None
    candidate_values: Optional[list[np.ndarray]] = None
    stop_after: Optional[tuple[int, ...]] = None
    stop_value: Optional[float] = None

    @property
    def end(self) -> int:
        # Every token is decoded, the last too (its logits predict nothing): the batches then
        # end where a whole-sequence evaluation's does, as _GRAIN asks.
        return len(self.tokens)

    @property
    def first_out(self) -> int:    # the logits at this position predict the first response token
        return self.n_prompt - 1

    @property
    def stop_out(self) -> int:     # logits are wanted at positions [first_out, stop_out)
        return len(self.tokens) - 1


@dataclass
class _TFStream:
    """Positions [cursor, end) of one sequence still to decode into cache/sequence id `seq`."""
    seq: int
    seq_data: _TFSeq
    cursor: int

    @property
    def end(self) -> int:
        return self.seq_data.end


class TeacherForcer(Engine):
    def teacher_force(self, prompt: list[int], response: list[int], temperature: float,
                      stop_tokens: Optional[Sequence[int]] = None) -> list[float]:
        """Per-token log softmax(logits / T) of `response` after `prompt`, from raw logits (with
        stop_tokens, the last token is a stop: see teacher_force_many)."""
        result = self.teacher_force_many([(prompt, response, temperature, stop_tokens)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def teacher_force_many(self, items: Sequence[tuple]) -> list[Union[list[float], ValueError]]:
        """Per-token log softmax(logits / T) of each (prompt, response, temperature) item's
        response after its prompt, from raw logits; or, for an item that cannot be scored
        (too long for the context, empty prompt), the ValueError saying why.

        An item (prompt, response, temperature, stop_tokens) with a non-empty stop set ends in a
        stop: the response's last token is one of stop_tokens, and its value is the stop event's,
        log sum over stop_tokens of p(token | prompt + response[:-1]) (sampling.stop_logprob).

        Items with identical prompt and response tokens are decoded once and scored at each of
        their temperatures: equal inputs give equal logits, and anything that differs (the
        rendered prompt, the response, the temperature) is computed on its own.
        """
        results: list = [None] * len(items)
        distinct: dict[tuple, _TFSeq] = {}
        for i, (prompt, response, temp, *rest) in enumerate(items):
            prompt, response = list(prompt), list(response)
            stop = tuple(rest[0]) if rest and rest[0] else None
            if not temp > 0:
                results[i] = ValueError(f"temperature must be positive (got {temp})")
            elif not response:
                results[i] = []
            elif stop is not None and response[-1] not in stop:
                results[i] = ValueError(f"the response ends in token {response[-1]}, not a stop token")
            elif not prompt:
                results[i] = ValueError("empty prompt")
            elif len(prompt) + len(response) > self.n_ctx_per_seq:
                results[i] = PromptTooLong(f"prompt + response of {len(prompt) + len(response)} "
                                           f"tokens exceed the context of {self.n_ctx_per_seq}")
            else:
                key = (tuple(prompt), tuple(response), stop)
                sq = distinct.get(key)
                if sq is None:
                    sq = distinct[key] = _TFSeq(prompt + response, len(prompt), stop_tokens=stop)
                sq.requests.append((i, float(temp)))
        seqs = list(distinct.values())
        for sq in seqs:
            for _, temp in sq.requests:
                sq.values.setdefault(temp, np.empty(len(sq.tokens) - sq.n_prompt))
        if seqs:
            self._teacher_force_packed(seqs)
        for sq in seqs:
            for i, temp in sq.requests:
                results[i] = sq.values[temp].tolist()
        return results

    def answer_logprobs_many(self, prompts: Sequence[Sequence[int]], candidates: Sequence[int]
                             ) -> list[Union[np.ndarray, ValueError]]:
        """For each prompt, log softmax (T = 1, the whole vocabulary) of the logits after its last
        token, at the `candidates` ids: a judge's answer distribution, read in one prefill with
        logits at the answer position only. Packed and prefix-shared like teacher forcing, so a
        prompt's values do not depend on the other prompts or their order (one numeric path).
        An item that cannot be scored gets the ValueError saying why."""
        cand = np.asarray(candidates, dtype=np.intp)
        results: list = [None] * len(prompts)
        distinct: dict[tuple, _TFSeq] = {}
        for i, prompt in enumerate(prompts):
            prompt = list(prompt)
            if not prompt:
                results[i] = ValueError("empty prompt")
            elif len(prompt) + 1 > self.n_ctx_per_seq:
                results[i] = PromptTooLong(f"a judge prompt of {len(prompt)} tokens exceeds the context "
                                           f"of {self.n_ctx_per_seq}")
            else:
                sq = distinct.get(tuple(prompt))
                if sq is None:
                    # The placeholder keeps the sequence shape of teacher forcing (its last token
                    # is decoded and predicts nothing); its logits are never read.
                    sq = distinct[tuple(prompt)] = _TFSeq(prompt + [int(cand[0])], len(prompt), readout=cand)
                sq.requests.append((i, 1.0))
        seqs = list(distinct.values())
        if seqs:
            self._teacher_force_packed(seqs)
        for sq in seqs:
            for i, _ in sq.requests:
                results[i] = sq.answer.copy()
        return results

    def teacher_force_readouts(self, items: Sequence[tuple]) -> list[Union[tuple[list[np.ndarray], Optional[float]], ValueError]]:
        """For each (prompt, stem, temperature, candidates, stop_tokens) item: the values
        log softmax(logits / T) of the ids candidates[k] after prompt + stem[:k], for k = 0 ..
        len(stem) (one id array per position, the last after the whole stem), and with a
        non-empty stop_tokens the stop event's value after the whole stem (stop_logprob); or the
        ValueError saying why not. The text-event search's one question to a model
        (ope_prep/text_probability.py). Decoded and packed as teacher forcing is, so a stem
        token's value read here is its teacher-forced value."""
        results: list = [None] * len(items)
        seqs: list[_TFSeq] = []
        for i, (prompt, stem, temp, candidates, stop) in enumerate(items):
            prompt, stem = list(prompt), list(stem)
            if not temp > 0:
                results[i] = ValueError(f"temperature must be positive (got {temp})")
            elif not prompt:
                results[i] = ValueError("empty prompt")
            elif len(candidates) != len(stem) + 1:
                results[i] = ValueError(f"{len(candidates)} candidate sets for {len(stem) + 1} positions")
            elif len(prompt) + len(stem) + 1 > self.n_ctx_per_seq:
                results[i] = PromptTooLong(f"prompt + response of {len(prompt) + len(stem) + 1} "
                                           f"tokens exceed the context of {self.n_ctx_per_seq}")
            else:
                # The placeholder's logits are never read: it makes the row after the stem a scored one.
                sq = _TFSeq(prompt + stem + [prompt[-1]], len(prompt),
                            candidates=[np.asarray(c, dtype=np.intp) for c in candidates],
                            stop_after=tuple(stop) if stop else None)
                sq.candidate_values = [np.empty(0)] * len(sq.candidates)
                sq.requests.append((i, float(temp)))
                seqs.append(sq)
        if seqs:
            self._teacher_force_packed(seqs)
        for sq in seqs:
            results[sq.requests[0][0]] = (sq.candidate_values, sq.stop_value)
        return results

    @staticmethod
    def _common_to_all(seqs: list[_TFSeq]) -> int:
        """The prefix every sequence shares before any scored position (and >= _GRAIN positions
        before its end), rounded down to a multiple of _GRAIN: a judge's rubric and examples."""
        lead = seqs[0]
        k = min(min(sq.first_out, sq.end - _GRAIN) for sq in seqs)
        for sq in seqs[1:]:
            k = _common_prefix(lead.tokens, sq.tokens, k)
        return max(0, k - k % _GRAIN)

    def _groups(self, seqs: list[_TFSeq], max_members: int, common: int) -> list[tuple[list[_TFSeq], int]]:
        """Runs of consecutive sequences whose prompts share a prefix of >= _MIN_SHARED tokens,
        and more than the `common` prefix of all, before any scored position (and >= _GRAIN
        positions before their end), with the length they all share, a multiple of _GRAIN."""
        groups: list[tuple[list[_TFSeq], int]] = []
        for sq in seqs:
            if groups and len(groups[-1][0]) < max_members:
                members, shared = groups[-1]
                lead = members[0]
                k = _common_prefix(lead.tokens, sq.tokens,
                                   min(lead.first_out, sq.first_out, sq.end - _GRAIN))
                k -= k % _GRAIN
                if k >= _MIN_SHARED and k > common:
                    groups[-1] = (members + [sq], min(shared, k) if len(members) > 1 else k)
                    continue
            groups.append(([sq], 0))
        return groups

    def _teacher_force_packed(self, seqs: list[_TFSeq]) -> None:
        """Decode the sequences, several per llama_decode call (up to n_batch tokens, each
        sequence its own id and cache), requesting logits only where they predict a response
        token.

        Entries go in descending sequence id, so llama.cpp computes each sequence's part as
        a ubatch of its own, and a sequence is split only at multiples of _GRAIN, into parts
        of at least _GRAIN tokens: each sequence is computed as in one batch on its own.
        A group of sequences sharing a prompt prefix decodes it once, in its first sequence;
        the others then copy that sequence's cache cells and decode only their own rest.
        """
        # A prefix common to all sequences that is long enough to pay for a cache copy per group
        # is held in the last sequence id for the whole call; each group's lead starts from a
        # copy of it. It stays there after the call, so the next call decodes only what its own
        # common prefix does not share with it (a judge's rubric and examples: once per stage).
        # Its cells are the ones a fresh decode would give: positions split at multiples of
        # _GRAIN, whatever the batch, give the same values (see _GRAIN).
        common = self._common_to_all(seqs) if len(seqs) > 1 and self.n_seq > 2 else 0
        if common < _MIN_COMMON:
            common = 0
        keep = self.n_seq - 1
        free = list(range(keep if common else self.n_seq))
        groups = deque(self._groups(seqs, len(free), common))
        active: list[_TFStream] = []
        waiting: list[tuple[_TFStream, _TFStream, int]] = []   # (lead, member, shared length)
        try:
            if common:
                for s in free:
                    self._clear(s)
                kept = _common_prefix(self._kept_prefix, seqs[0].tokens, common)
                kept -= kept % _GRAIN
                if kept < len(self._kept_prefix) or kept == 0:   # 0: whatever the sequence holds goes
                    self._trim(keep, kept)
                if kept < common:
                    self._kept_prefix = []          # until its cells are all there
                    self._prefill(seqs[0].tokens[:common], keep, start=kept)
                self._kept_prefix = list(seqs[0].tokens[:common])
            else:
                self._clear()
            while groups or active or waiting:
                while groups and len(free) >= len(groups[0][0]):
                    members, shared = groups.popleft()
                    streams = [_TFStream(free.pop(0), sq, shared) for sq in members]
                    streams[0].cursor = common
                    if common:
                        self._share_prefix(self.n_seq - 1, streams[0].seq, common)
                    active.append(streams[0])
                    waiting.extend((streams[0], st, shared) for st in streams[1:])
                entries: list[tuple] = []
                plan: list[tuple[_TFStream, int, int, int]] = []  # stream, entry index, pos, n outputs
                n_tok, n_out = self.n_batch, self.max_outputs
                for st in sorted(active, key=lambda st: -st.seq):
                    n = self._chunk(st, n_tok, n_out, first=not entries)
                    if n == 0:
                        continue
                    sq = st.seq_data
                    o0, o1 = self._output_rows(sq, st.cursor, st.cursor + n)
                    plan.append((st, len(entries) + o0 - st.cursor, o0, o1 - o0))
                    entries.extend((sq.tokens[p], p, st.seq, o0 <= p < o1)
                                   for p in range(st.cursor, st.cursor + n))
                    st.cursor += n
                    n_tok -= n
                    n_out -= o1 - o0
                if not entries:
                    raise RuntimeError("teacher forcing made no progress")
                self._decode(entries)
                for st, first, pos, rows in plan:
                    if rows:
                        self._score(st.seq_data, first, pos, rows)
                # Members whose shared prefix is now in their lead's cache start from a copy of it
                # (before a finished lead's cells are released).
                for lead, member, shared in [w for w in waiting if w[0].cursor >= w[2]]:
                    self._share_prefix(lead.seq, member.seq, shared)
                    active.append(member)
                waiting = [w for w in waiting if w[0].cursor < w[2]]
                for st in [st for st in active if st.cursor == st.end]:
                    self._clear(st.seq)
                    free.append(st.seq)
                active = [st for st in active if st.cursor < st.end]
                free.sort()
        except BaseException:
            self._clear()
            raise
        for s in range(keep if common else self.n_seq):    # the kept prefix stays
            self._clear(s)

    @staticmethod
    def _output_rows(sq: _TFSeq, start: int, stop: int) -> tuple[int, int]:
        """The positions [o0, o1) of part [start, stop) that get logits rows: the scored ones,
        widened to _GRAIN rows (extra rows are not used) when there are fewer but some."""
        o0, o1 = max(start, sq.first_out), min(stop, sq.stop_out)
        if o0 >= o1:
            return start, start
        if o1 - o0 < _GRAIN:
            o0 = max(start, o1 - _GRAIN)
            o1 = min(stop, o0 + _GRAIN)
        return o0, o1

    def _chunk(self, st: _TFStream, n_tok: int, n_out: int, first: bool) -> int:
        """How many of st's next positions go in a batch with n_tok tokens and n_out logits
        rows left (0: none). A part that does not finish the sequence ends at a multiple of
        _GRAIN and leaves at least _GRAIN; every part has at least _GRAIN tokens."""
        sq = st.seq_data
        left = st.end - st.cursor
        fits = min(left, n_tok, max(0, sq.first_out - st.cursor) + n_out)
        if st.cursor + fits == sq.stop_out and fits < n_tok:
            fits += 1    # the last token wants no logits
        n = fits
        if n < left:
            stop = min(st.cursor + n, st.end - _GRAIN)
            n = stop - stop % _GRAIN - st.cursor
        if n >= min(left, _GRAIN):
            o0, o1 = self._output_rows(sq, st.cursor, st.cursor + n)
            if o1 - o0 <= n_out:
                return n
        # Only a vocabulary so large that fewer than _GRAIN rows fit in the output buffer
        # gets here with an empty batch: then take what fits.
        return max(1, fits) if first else 0

    def _score(self, sq: _TFSeq, first_entry: int, pos: int, n: int) -> None:
        """Log-probabilities of the response tokens predicted by the logits rows of batch
        entries first_entry.. (positions pos..pos+n-1; rows outside the response unused)."""
        rows = self._rows(first_entry, n)
        a, b = max(pos, sq.first_out), min(pos + n, sq.stop_out)
        if sq.readout is not None:
            if a < b:
                sq.answer = log_softmax(rows[a - pos], 1.0)[sq.readout]
            return
        if sq.candidates is not None:
            temp = sq.requests[0][1]
            for j in range(a, b):
                k = j - sq.first_out
                sq.candidate_values[k] = candidate_logprobs(rows[j - pos], sq.candidates[k], temp)
                if sq.stop_after is not None and k == len(sq.candidates) - 1:
                    sq.stop_value = stop_logprob(rows[j - pos], sq.stop_after, temp)
            return
        targets = sq.tokens[a + 1:b + 1]
        k = a - sq.first_out
        for temp, values in sq.values.items():
            values[k:k + b - a] = token_logprobs(rows[a - pos:b - pos], targets, temp)
            if sq.stop_tokens is not None and b == sq.stop_out:    # this part holds the stop
                values[-1] = stop_logprob(rows[b - 1 - pos], sq.stop_tokens, temp)
