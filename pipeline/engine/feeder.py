"""The fast engine's input side: requests pulled and run through the processor ahead of need."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable

import torch

from pipeline.engine import multimodal
from pipeline.engine.base import Result, stage_error
from pipeline.logs import log

GATHER_S = 0.1
_END = object()


class Feeder:
    """Pulls requests and runs the processor on them on a helper thread, `lookahead` rows ahead.

    The caller's iterator is consumed on that thread (one consumer at a time), so a slow media
    decode upstream stalls the engine only once every slot has emptied. Requests that share a media
    (`Request.shared`) are queued and taken as one group: their media is preprocessed once, and the
    engine gets them in one refill, where their vision pass and common prefix can be shared.
    """

    def __init__(self, processor, tagged: Iterable, lookahead: int):
        self.processor, self.q = processor, queue.Queue(maxsize=lookahead)
        self.stop, self.read_all = threading.Event(), threading.Event()
        self.lock, self.queued = threading.Lock(), 0  # rows in the queue
        self.held: list = []  # the rest of a group too large for the last take
        self.sharing: bool | None = None  # whether encode_sharing gives the processor's tokens
        self.thread = threading.Thread(target=self._fill, args=(iter(tagged),), daemon=True, name="encode")
        self.thread.start()

    def _fill(self, it) -> None:
        try:
            group: list = []
            for tag, req in it:
                if group and not _same_media(group[-1][1], req):
                    if not self._put(self._encode(group)):
                        return
                    group = []
                group.append((tag, req))
                if req.shared is None or len(group) >= req.shared.count:
                    if not self._put(self._encode(group)):
                        return
                    group = []
            if group and not self._put(self._encode(group)):
                return
            if self._put(_END):
                self.read_all.set()
        except BaseException as e:  # noqa: BLE001 - the upstream iterator failed: re-raised in take()
            self._put(e)

    def _encode(self, group: list) -> list:
        """(tag, request, Encoded or Result) for each; the first's media preprocessing serves them all."""
        out, first = [], None
        for tag, req in group:
            try:
                enc = multimodal.encode(self.processor, req) if first is None else self._share(req, first)
            except Exception as e:  # noqa: BLE001 - e.g. an image the processor cannot resize
                enc = Result(error=stage_error("preprocess", e))
            first = first or (enc if isinstance(enc, multimodal.Encoded) else None)
            out.append((tag, req, enc))
        return out

    def _share(self, req, first: multimodal.Encoded) -> multimodal.Encoded:
        """Another prompt of `first`'s media, its preprocessing shared; checked once against the
        processor's own output, and if they differ (a processor we do not know) every prompt is
        preprocessed on its own from then on: slower, never wrong."""
        if self.sharing is False:
            return multimodal.encode(self.processor, req)
        why = "its tokens differ from the processor's"
        try:
            enc = multimodal.encode_sharing(self.processor, req, first)
        except Exception as e:  # noqa: BLE001 - a processor without the placeholder attributes
            enc, why = None, f"{type(e).__name__}: {e}"
        if self.sharing is None:
            full = multimodal.encode(self.processor, req)
            self.sharing = enc is not None and torch.equal(full.input_ids, enc.input_ids)
            if not self.sharing:
                log.warning(f"prompts of one media cannot share their preprocessing ({why}); "
                            "each is preprocessed on its own")
                return full
        return enc if enc is not None else multimodal.encode(self.processor, req)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                if isinstance(item, list):
                    with self.lock:
                        self.queued += len(item)
                return True
            except queue.Full:
                continue
        return False

    def left(self) -> int:
        """Rows still to take once the input is read to its end (sys.maxsize until then)."""
        with self.lock:
            return self.queued + len(self.held) if self.read_all.is_set() else sys.maxsize

    def take(self, n: int, block: bool) -> tuple[list, bool]:
        """Up to n items; returns (items, exhausted). Without `block`, only what is ready. A group
        is taken whole or left for a later take (split only when, with `block`, it alone is larger
        than n: more slots than n will not come free).

        With `block` (every slot empty: nothing to overlap with) it waits for the first item, then
        up to GATHER_S for the rest, so a cold start prefills one batch instead of a trickle.
        """
        items, deadline = [], time.perf_counter() + GATHER_S
        while len(items) < n:
            group, self.held = self.held or self._next(block, bool(items), deadline), []
            if group is None:
                break
            if group is _END:
                return items, True
            if not items:
                deadline = time.perf_counter() + GATHER_S
            room = n - len(items)
            if len(group) > room:  # whole in a later take; split only when every slot is free for it
                items, self.held = (group[:room], group[room:]) if block and not items else (items, group)
                break
            items += group
        return items, False

    def _next(self, block: bool, started: bool, deadline: float):
        """The next queued group, _END, or None when none is ready in time."""
        wait = (max(deadline - time.perf_counter(), 0.0) if block else 0.0) if started else None
        try:
            item = self.q.get(block=block and wait != 0.0, timeout=wait)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        if item is not _END:
            with self.lock:
                self.queued -= len(item)
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _same_media(a, b) -> bool:
    return a.shared is not None and b.shared is not None and a.shared.key == b.shared.key
