"""The driver loop all pools share (in-process, worker processes, Ray actors), and `Pool`, what it drives.

A pool owns N slots (one per device), starts a worker in each and reports events:
(slot, "ready" | "beat" | "chunk" | "done" | "lost" | "error" | "died", message). The driver hands
shards from the `ShardQueue` to ready slots and turns deaths into retries. A slot whose worker keeps
dying before it is ready (broken device, model that cannot load) is given up after max_retries.

A hung worker (alive, but stuck: a device call that never returns, a deadlock) is treated as a dead
one: a worker on a shard must be heard from within `pool.worker_timeout_s` (run.worker_timeout_s).
Any event counts; workers send "beat" as rows come out of their engine, so silence means the engine
itself stopped, not merely that a chunk is long. A silent worker is replaced (`start` stops the old
one first) and its shard retried. The in-process pool cannot replace its worker, this process's main
thread: the run then releases its leases and exits 1 with one line, so that whatever runs it (a
scheduler, a retry loop) runs it again, resuming from the committed chunks.

Starting (loading the model) is not timed: it has no progress to watch, and it takes seconds or many
minutes with the model, the storage and a first run's kernel build, so a deadline there would either
have to exceed the slowest load or kill healthy workers. A worker stuck starting holds no shard: the
others do the job, and close() stops it.
"""

from __future__ import annotations

import os
import sys
import time
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
    worker_timeout_s: float  # a worker on a shard and silent this long is hung
    restartable: bool  # False: the worker is this process's main thread, a hung one cannot be replaced

    def start(self, slot: int) -> None:
        """(Re)start the worker in `slot`, first stopping the one there if it still runs (a hung one);
        it reports "ready", or "died" if it cannot start."""

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
        self.heard: dict[int, float] = {}  # slot on a shard -> when it last said anything

    def run(self) -> None:
        for slot in self.pool.slots:
            self.pool.start(slot)
        while self.queue.pending() or self.current:
            while self.idle and (shard := self.queue.next()) is not None:
                slot = self.idle.pop()
                self.current[slot] = shard
                self.heard[slot] = time.monotonic()
                self.pool.submit(slot, shard.index)
            if not self.start_failures:
                self.queue.give_up("no worker could be started")
                return
            event = self.pool.event(timeout=0.5)
            if event is not None:
                self.handle(*event)
            self.check_deadlines()

    def handle(self, slot: int, kind: str, msg: dict) -> None:
        if slot in self.heard:
            self.heard[slot] = time.monotonic()
        if kind == "ready":
            self.became_idle(slot)
            self.start_failures[slot] = 0
        elif kind == "chunk":
            self.progress.add(msg["rows"], msg.get("errors", 0))
        elif kind in ("done", "lost"):
            shard = self.current.pop(slot)
            (self.queue.done if kind == "done" else self.queue.lost)(shard)
            self.became_idle(slot)
        elif kind == "error":  # a Python error inside the shard; the worker goes on or exits
            _retry(self.queue, self.current.pop(slot), f"worker {slot}: {msg['error']}")
            if msg.get("alive"):
                self.became_idle(slot)
        elif kind == "died":
            self.died(slot, msg)

    def became_idle(self, slot: int) -> None:
        self.idle.add(slot)
        self.heard.pop(slot, None)  # an idle worker owes us nothing

    def died(self, slot: int, msg: dict, how: str = "died") -> None:
        self.idle.discard(slot)
        self.heard.pop(slot, None)
        shard = self.current.pop(slot, None)
        if shard is not None:
            _retry(self.queue, shard, f"worker {slot} {how}: {msg['error']}")
        elif not msg.get("was_ready"):
            self.start_failures[slot] += 1
        if self.start_failures[slot] > self.max_retries:
            log.warning(f"worker {slot} ({self.pool.devices[slot]}) failed to start "
                        f"{self.start_failures[slot]} times; giving up on it")
            del self.start_failures[slot]
            return
        self.pool.start(slot)

    def check_deadlines(self) -> None:
        limit = self.pool.worker_timeout_s
        now = time.monotonic()
        for slot in [s for s, heard in self.heard.items() if now - heard > limit]:
            self.hung(slot, limit)

    def hung(self, slot: int, limit: float) -> None:
        """Replace a worker that went silent, and retry its shard, as for one that died."""
        silent = f"nothing from it for {limit:g} s (run.worker_timeout_s)"
        if not self.pool.restartable:
            _abandon(self.queue, f"the shard running in this process has made no progress: {silent}; "
                                 "exiting so the run can be rerun (it resumes from the committed chunks)")
        self.died(slot, {"error": f"{silent}, replaced", "was_ready": True}, how="hung")


def _abandon(queue: ShardQueue, reason: str) -> None:
    """Exit the process now: its main thread is stuck, so nothing can unwind through it."""
    log.error(f"error: {reason}")
    queue.leases.release_all()  # a rerun, here or on another node, need not wait for them to expire
    sys.stderr.flush()
    os._exit(1)


def _retry(queue: ShardQueue, shard, error: str) -> None:
    queue.died(shard, error)
    if shard.index in queue.failed:
        log.warning(f"shard {shard.index} FAILED after {queue.attempts[shard.index]} attempts: {error}")
    else:
        log.warning(f"{error}; retrying shard {shard.index} from its last committed chunk "
                    f"(attempt {queue.attempts[shard.index] + 1})")
