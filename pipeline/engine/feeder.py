"""The fast engine's input side: requests pulled and run through the processor ahead of need."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable

from pipeline.engine import multimodal
from pipeline.engine.base import Result, stage_error

GATHER_S = 0.1
_END = object()


class Feeder:
    """Pulls requests and runs the processor on them on a helper thread, `lookahead` rows ahead.

    The caller's iterator is consumed on that thread (one consumer at a time), so a slow media
    decode upstream stalls the engine only once every slot has emptied.
    """

    def __init__(self, processor, tagged: Iterable, lookahead: int):
        self.processor, self.q = processor, queue.Queue(maxsize=lookahead)
        self.stop, self.read_all = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(iter(tagged),), daemon=True, name="encode")
        self.thread.start()

    def _fill(self, it) -> None:
        try:
            for tag, req in it:
                try:
                    enc = multimodal.encode(self.processor, req)
                except Exception as e:  # noqa: BLE001 - e.g. an image the processor cannot resize
                    enc = Result(error=stage_error("preprocess", e))
                if not self._put((tag, req, enc)):
                    return
            if self._put(_END):
                self.read_all.set()
        except BaseException as e:  # noqa: BLE001 - the upstream iterator failed: re-raised in take()
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def left(self) -> int:
        """Rows still to take once the input is read to its end (sys.maxsize until then)."""
        return self.q.qsize() - 1 if self.read_all.is_set() else sys.maxsize

    def take(self, n: int, block: bool) -> tuple[list, bool]:
        """Up to n items; returns (items, exhausted). Without `block`, only what is ready.

        With `block` (every slot empty: nothing to overlap with) it waits for the first item, then
        up to GATHER_S for the rest, so a cold start prefills one batch instead of a trickle.
        """
        items, deadline = [], time.perf_counter() + GATHER_S
        while len(items) < n:
            if not items:  # the first item: as long as it takes, when blocking
                wait = None
            else:
                wait = max(deadline - time.perf_counter(), 0.0) if block else 0.0
            try:
                item = self.q.get(block=block and wait != 0.0, timeout=wait)
            except queue.Empty:
                break
            if not items:
                deadline = time.perf_counter() + GATHER_S
            if item is _END:
                return items, True
            if isinstance(item, BaseException):
                raise item
            items.append(item)
        return items, False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
