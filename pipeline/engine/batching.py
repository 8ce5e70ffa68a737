"""The hf engine's batches, cut from a stream of requests.

Batch composition decides the hf engine's output (left padding, and the sampling seed of a batch),
so it is fixed here: rows of one media kind in arrival order, up to `max_size`, never across a
`Request.group`; a full batch goes at once, the others when the group ends (images, then videos).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pipeline.engine.base import Request

KINDS = ("image", "video")
_START = object()


def batches(requests: Iterable[Request], max_size: int) -> Iterator[list[Request]]:
    open_: dict[str, list[Request]] = {kind: [] for kind in KINDS}
    group = _START
    for req in requests:
        if req.group != group:
            yield from _close(open_)
            group = req.group
        batch = open_[req.kind]
        batch.append(req)
        if len(batch) >= max_size:
            open_[req.kind] = []
            yield batch
    yield from _close(open_)


def _close(open_: dict[str, list[Request]]) -> Iterator[list[Request]]:
    for kind in KINDS:
        if open_[kind]:
            batch, open_[kind] = open_[kind], []
            yield batch
