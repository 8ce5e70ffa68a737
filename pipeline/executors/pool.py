"""The driver loop all pools share (in-process, worker processes, Ray actors), and `Pool`, what it drives.

A pool owns N slots (one per device), starts a worker in each and reports events:
(slot, "ready" | "chunk" | "done" | "lost" | "error" | "died", message). The driver hands shards
from the `ShardQueue` to ready slots and turns deaths into retries. A slot whose worker keeps
dying before it is ready (broken device, model that cannot load) is given up after max_retries.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

from tqdm import tqdm

from pipeline.executors.shard_queue import ShardQueue
from pipeline.logs import log

Event = tuple[int, str, dict]  # (slot, kind, message)


class Pool(Protocol):
    """What the driver needs of an executor."""

    slots: list[int]
    devices: list[str]  # per slot: the device its worker runs on

    def start(self, slot: int) -> None:
        """(Re)start the worker in `slot`; it reports "ready", or "died" if it cannot start."""

    def submit(self, slot: int, shard: int) -> None:
        """Hand `shard` to the ready worker in `slot`."""

    def event(self, timeout: float) -> Event | None:
        """The next event, or None when none came within `timeout` seconds."""

    def serve(self, drive: Callable[[], None]) -> None:
        """Run `drive` (the driver loop) to its end. Pools whose workers run elsewhere just call it;
        the in-process pool runs the shards on this thread meanwhile."""

    def close(self) -> None:
        """Stop every worker."""


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, unit="row", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                        desc="captioning")
        self.rows = self.errors = 0

    def add(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors
        self.bar.update(rows)
        self.bar.set_postfix(errors=self.errors, refresh=False)

    def close(self) -> None:
        self.bar.close()


def drive(pool: Pool, queue: ShardQueue, progress: Progress, max_retries: int) -> None:
    """Run until every shard of this run's share is done or failed; the workers stop either way."""
    try:
        _Driver(pool, queue, progress, max_retries).run()
    finally:
        pool.close()


class _Driver:
    def __init__(self, pool: Pool, queue: ShardQueue, progress: Progress, max_retries: int):
        self.pool, self.queue, self.progress, self.max_retries = pool, queue, progress, max_retries
        self.idle: set[int] = set()
        self.current: dict[int, object] = {}  # slot -> the shard it works on
        self.start_failures = dict.fromkeys(pool.slots, 0)  # slots still in use

    def run(self) -> None:
        for slot in self.pool.slots:
            self.pool.start(slot)
        while self.queue.pending() or self.current:
            while self.idle and (shard := self.queue.next()) is not None:
                slot = self.idle.pop()
                self.current[slot] = shard
                self.pool.submit(slot, shard.index)
            if not self.start_failures:
                self.queue.give_up("no worker could be started")
                return
            event = self.pool.event(timeout=0.5)
            if event is not None:
                self.handle(*event)

    def handle(self, slot: int, kind: str, msg: dict) -> None:
        if kind == "ready":
            self.idle.add(slot)
            self.start_failures[slot] = 0
        elif kind == "chunk":
            self.progress.add(msg["rows"], msg.get("errors", 0))
        elif kind in ("done", "lost"):
            shard = self.current.pop(slot)
            (self.queue.done if kind == "done" else self.queue.lost)(shard)
            self.idle.add(slot)
        elif kind == "error":  # a Python error inside the shard; the worker goes on or exits
            _retry(self.queue, self.current.pop(slot), f"worker {slot}: {msg['error']}")
            if msg.get("alive"):
                self.idle.add(slot)
        elif kind == "died":
            self.died(slot, msg)

    def died(self, slot: int, msg: dict) -> None:
        self.idle.discard(slot)
        shard = self.current.pop(slot, None)
        if shard is not None:
            _retry(self.queue, shard, f"worker {slot} died: {msg['error']}")
        elif not msg.get("was_ready"):
            self.start_failures[slot] += 1
        if self.start_failures[slot] > self.max_retries:
            log.warning(f"worker {slot} ({self.pool.devices[slot]}) failed to start "
                        f"{self.start_failures[slot]} times; giving up on it")
            del self.start_failures[slot]
            return
        self.pool.start(slot)


def _retry(queue: ShardQueue, shard, error: str) -> None:
    queue.died(shard, error)
    if shard.index in queue.failed:
        log.warning(f"shard {shard.index} FAILED after {queue.attempts[shard.index]} attempts: {error}")
    else:
        log.warning(f"{error}; retrying shard {shard.index} from its last committed chunk "
                    f"(attempt {queue.attempts[shard.index] + 1})")
