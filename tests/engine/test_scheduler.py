"""The fast engine's slot bookkeeping on its own: refills, moves, stops. No model."""

from __future__ import annotations

from pipeline.engine.base import Request
from pipeline.engine.scheduler import Scheduler
from pipeline.engine.sequence import Sequence

EOS = 2


def seq(i: int, n_prompt: int = 5) -> Sequence:
    return Sequence(i, Request(i, "p", "image"), None, n_prompt)


def scheduler(max_new: int = 10, ignore_eos: bool = False, compact: bool = True) -> Scheduler:
    return Scheduler(4, max_new, {EOS}, ignore_eos=ignore_eos, refill_at=2, compact=compact)


def admitted(sched: Scheduler, seqs: list[Sequence]) -> list[Sequence]:
    sched.assign(seqs, sched.free())
    return sched.admit((s, 7) for s in seqs)


def test_refill_waits_for_refill_at_free_slots_and_blocks_only_when_idle():
    sched = scheduler()
    assert sched.refill(False, lambda: 100) == (4, True)
    admitted(sched, [seq(i) for i in range(4)])
    assert sched.refill(False, lambda: 100) == (0, False)
    sched.postprocess([0], [EOS] + [5] * 3)
    assert sched.refill(False, lambda: 100) == (0, False), "one free slot of refill_at=2"
    assert sched.refill(False, lambda: 1) == (1, False), "fewer rows are left than refill_at"
    assert sched.refill(True, lambda: 1) == (0, False), "nothing is left"


def test_compaction_moves_the_last_live_rows_into_the_first_free_slots():
    sched = scheduler()
    seqs = [seq(i, n_prompt=3 + i) for i in range(4)]
    admitted(sched, seqs)
    done = sched.postprocess([0, 1, 2, 3], [EOS, 5, EOS, 5])
    assert done == [seqs[0], seqs[2]]
    assert sched.compaction() == [(3, 0, seqs[3].position)]
    assert sched.rows[:2] == [seqs[3], seqs[1]] and seqs[3].slot == 0
    assert sched.running() == ([0, 1], [seqs[3], seqs[1]])
    assert scheduler(compact=False).compaction() == []


def test_rows_stop_at_eos_or_length_and_ignore_eos_runs_to_the_length():
    sched = scheduler(max_new=2)
    a, b = seq(0), seq(1)
    assert admitted(sched, [a, b]) == []
    assert sched.postprocess([0, 1], [EOS, 4]) == [a, b], "EOS, and the second token of two"
    assert (a.tokens, b.tokens) == ([7, EOS], [7, 4])
    sched = scheduler(max_new=3, ignore_eos=True)
    c = seq(2)
    admitted(sched, [c])
    assert sched.postprocess([0], [EOS]) == [] and sched.postprocess([0], [EOS]) == [c]


def test_stop_on_repetition_stops_where_the_caption_is_cut():
    """The scheduler's token-by-token loop check stops a row at the very token where
    data/quality.repetition_stop (the rule caption_result cuts at, for both engines) says so."""
    from pipeline.data.quality import repetition_stop
    from pipeline.engine.base import caption_result

    class Words:
        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    stream = [9, 4, 5, 6, 4, 5, 6, 4, 5, 6, 4, 5, 6, 4, 5, 6]
    sched = Scheduler(1, 50, {EOS}, ignore_eos=False, refill_at=1, stop_on_repetition=True)
    row = seq(0)
    sched.assign([row], sched.free())
    finished = sched.admit([(row, stream[0])])
    for token in stream[1:]:
        if finished:
            break
        finished = sched.postprocess([0], [token])
    assert finished == [row] and len(row.tokens) == repetition_stop(stream) == 13
    result = caption_result(stream, 5, {EOS}, Words(), stop_on_repetition=True)
    assert (result.n_output_tokens, result.finish_reason) == (13, "repetition")
    assert caption_result(stream, 5, {EOS}, Words()).finish_reason == "length"  # off: no cut
