"""Which sequence sits in which cache slot: when to refill free slots, when to move rows down, when
a row stops. (Part of the fast engine, pipeline/engine/fast.py.)

Pure bookkeeping on the host: no model, no cache. The engine asks what to do before a step, runs it
and hands back every row's new token; the moves it is told of it applies to the cache itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipeline.data.quality import NGRAM, TIMES
from pipeline.engine.sequence import Sequence


class Scheduler:
    def __init__(self, slots: int, max_new: int, eos_ids: set[int], *, ignore_eos: bool, refill_at: int,
                 compact: bool = True, max_refill: int | None = None, stop_on_repetition: bool = False):
        self.rows: list[Sequence | None] = [None] * slots
        self.max_new, self.eos_ids, self.ignore_eos = max_new, eos_ids, ignore_eos
        self.refill_at, self.compact = refill_at, compact
        self.max_refill = max_refill or slots
        self.stop_on_repetition = stop_on_repetition

    def free(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def active(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]

    def refill(self, exhausted: bool, left: Callable[[], int]) -> tuple[int, bool]:
        """(how many queued rows to take now, whether to wait for them); `left()`: rows still queued.

        Refill once refill_at slots are free (fewer when fewer rows are left, any when nothing
        decodes): each refill adds prompt rows to a step, while an empty slot costs nothing (a
        captured step: at most the padding to its bucket). Never more than max_refill rows at once,
        the prefill the memory plan made room for. Wait for input only when nothing decodes.
        """
        free = self.rows.count(None)
        idle = free == len(self.rows)
        if free and not exhausted and (idle or free >= min(self.refill_at, left())):
            return min(free, self.max_refill), idle
        return 0, idle

    def compaction(self) -> list[tuple[int, int, int]]:
        """Move rows down until the live ones fill slots [0, k), so a step decodes k rows, not all:
        an empty slot then costs nothing, where it would cost 1/max_batch_size of every step (and a
        captured step replays the graph of k rows' bucket). Returns the (src, dst, length) cache
        moves to make, in order; the rows are already moved here."""
        moves = []
        while self.compact:
            free, active = self.free(), self.active()
            if not free or not active or free[0] > active[-1]:
                break
            src, dst = active[-1], free[0]
            seq = self.rows[src]
            moves.append((src, dst, seq.position))
            self.rows[dst], self.rows[src] = seq, None
            seq.slot = dst
        return moves

    @staticmethod
    def assign(seqs: list[Sequence], free: list[int]) -> list[int]:
        """Give `seqs` the first free slots, in order; returns the slots still free after them."""
        for seq, slot in zip(seqs, free, strict=False):
            seq.slot = slot
        return free[len(seqs):]

    def running(self) -> tuple[list[int], list[Sequence | None]]:
        """(the live slots, the rows a step decodes): slots [0, last live one] when compacting, else all."""
        active = self.active()
        width = active[-1] + 1 if self.compact else len(self.rows)
        return active, self.rows[:width]

    def postprocess(self, active: list[int], tokens: list[int]) -> list[Sequence]:
        """Record a step's token for each live slot; returns the rows that finished (their slots freed)."""
        return [seq for i in active if (seq := self._push(i, tokens[i])) is not None]

    def admit(self, placed: Iterable[tuple[Sequence, int]]) -> list[Sequence]:
        """Prefilled rows take their slots with their first token; returns those already finished."""
        finished = []
        for seq, token in placed:
            seq.encoded = seq.embeds = None  # in the cache now
            self.rows[seq.slot] = seq
            if self._push(seq.slot, token) is not None:
                finished.append(seq)
        return finished

    def evict(self, active: list[int]) -> list[Sequence]:
        """Take the rows out of these slots (their step failed)."""
        out = [self.rows[i] for i in active]
        for i in active:
            self.rows[i] = None
        return out

    def _push(self, slot: int, token: int) -> Sequence | None:
        seq = self.rows[slot]
        seq.tokens.append(token)
        stop = not self.ignore_eos and token in self.eos_ids
        if not stop and self.stop_on_repetition and len(seq.tokens) >= NGRAM:
            # the rule of data/quality.repetition_stop, kept up token by token
            gram = tuple(seq.tokens[-NGRAM:])
            seq.ngrams[gram] = seq.ngrams.get(gram, 0) + 1
            stop = seq.ngrams[gram] >= TIMES
        if stop or len(seq.tokens) >= self.max_new:
            self.rows[slot] = None
            return seq
        return None
