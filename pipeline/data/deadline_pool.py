"""Threads that run each item under a deadline and are never waited for (media reads and decodes).

A read may hang on a stalled mount or a special file and a decoder may loop; neither may stop a chunk
or the shutdown.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.errors import LlavaBatchError


@dataclass(eq=False)
class _Task:
    item: object
    done: threading.Event = field(default_factory=threading.Event)
    started: float | None = None  # monotonic time a thread took it
    abandoned: bool = False
    result: object = None


class DeadlinePool:
    """`workers` daemon threads running `fn` on items, each item under a deadline.

    A read or a decode may never return (a hung mount, a decoder caught in a loop), so nothing ever
    waits for a thread to end: past its deadline a row gets an error, its thread is written off and
    a fresh one takes its place, so the pool keeps its width. Daemon threads, because an exiting
    interpreter joins concurrent.futures' threads and would hang on a stuck one. Threads written off
    and still running are counted per process (they outlive the shard): past STUCK_LIMIT the storage
    or the decoder is broken for the whole job, and the shard fails (a rerun retries it) rather than
    growing threads without end or committing every row as an error.
    """

    STUCK_LIMIT = 16
    _stuck = 0
    _lock = threading.Lock()

    def __init__(self, fn: Callable, workers: int, timeout: float, *, failed: Callable, timed_out: Callable):
        """`failed(item, exc)`: the result when `fn` raises; `timed_out(item)`: the result past the
        deadline (the stuck thread still holds `item`, so it must not be changed)."""
        self.fn, self.timeout, self.failed, self.timed_out = fn, timeout, failed, timed_out
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.closed, self.live = False, 0
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        self.live += 1
        threading.Thread(target=self._work, daemon=True, name="decode").start()

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None and not self.closed:
            if not self._run(task):
                return  # written off while it ran: its replacement already runs

    def _run(self, task: _Task) -> bool:
        task.started = time.monotonic()
        try:
            task.result = self.fn(task.item)
        except BaseException as e:  # noqa: BLE001 - the item fails, the thread lives on
            task.result = self.failed(task.item, e)
        with DeadlinePool._lock:
            task.done.set()
            if task.abandoned:
                DeadlinePool._stuck -= 1
            return not task.abandoned

    def submit(self, item) -> _Task:
        task = _Task(item)
        self.tasks.put(task)
        return task

    def result(self, task: _Task):
        """`fn`'s result, or past the deadline (counted from when a thread took the item) `timed_out`'s."""
        while not task.done.wait(self._left(task)):
            with DeadlinePool._lock:
                if not task.done.is_set() and self._left(task) == 0.0:
                    return self._abandon(task)
        return task.result

    def _left(self, task: _Task) -> float:
        if task.started is None:  # still queued: it starts once a thread frees up
            return self.timeout
        return max(task.started + self.timeout - time.monotonic(), 0.0)

    def _abandon(self, task: _Task):
        task.abandoned = True
        DeadlinePool._stuck += 1
        if DeadlinePool._stuck > self.STUCK_LIMIT:
            raise LlavaBatchError(f"{DeadlinePool._stuck} media reads/decodes are stuck past "
                                  f"run.decode_timeout_s={self.timeout:g}s; is the media storage hanging?")
        self.live -= 1
        if not self.closed:  # a consumer still waiting after close() must not start an idle thread for good
            self._spawn()
        return self.timed_out(task.item)

    def close(self) -> None:
        """Stop the idle threads; a stuck one is left to the daemon's fate, never waited for."""
        self.closed = True
        for _ in range(self.live):
            self.tasks.put(None)


def in_order(pool: DeadlinePool, items: Iterable, window: int) -> Iterator:
    """Results in item order, at most `window` in flight, so memory stays bounded."""
    pending: deque[_Task] = deque()
    for item in items:
        pending.append(pool.submit(item))
        if len(pending) >= window:
            yield pool.result(pending.popleft())
    while pending:
        yield pool.result(pending.popleft())
