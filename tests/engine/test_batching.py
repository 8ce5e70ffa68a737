"""The hf engine's batch composition, which its outputs depend on (padding, the sampling seed)."""

from __future__ import annotations

from pipeline.engine.base import Request
from pipeline.engine.batching import batches


def rows(spec: str, group: int, start: int) -> list[Request]:
    return [Request(start + i, "p", {"i": "image", "v": "video"}[c], group=group) for i, c in enumerate(spec)]


def ids(out: list[list[Request]]) -> list[list[int]]:
    return [[r.row_index for r in batch] for batch in out]


def test_rows_batch_by_kind_up_to_the_size_and_never_across_groups():
    stream = rows("iivii", 0, 0) + rows("vvi", 1, 10)
    assert ids(list(batches(stream, 2))) == [[0, 1], [3, 4], [2], [10, 11], [12]]


def test_a_full_batch_goes_before_the_rest_of_its_group_is_read():
    pulled = []

    def lazy():
        for r in rows("iii", 0, 0):
            pulled.append(r.row_index)
            yield r

    it = batches(lazy(), 2)
    assert ids([next(it)]) == [[0, 1]] and pulled == [0, 1]
    assert ids(list(it)) == [[2]]


def test_rows_without_a_group_are_one_group():
    assert ids(list(batches(rows("ivi", None, 0), 8))) == [[0, 2], [1]]
