"""Which shard runs next, for every executor: node partitioning, stealing, leases and retries.

One `ShardQueue` lives in the process that owns the leases (the local parent or the Ray driver).
Workers only ever see a shard handed to them. A shard whose worker died goes back to the front of
the queue until it has used its retries; then it gets a `.failed.json` marker and the job goes on.
A full disk is the exception: every shard would fail alike, so it stops the job (one line, exit 1)
wherever it was hit, in this process or reported by a worker.
"""

from __future__ import annotations

import time
from collections import deque

from pipeline.config import RunConfig
from pipeline.data.disk_full import DiskFullError, disk_full_report
from pipeline.data.manifest import Shard
from pipeline.data.output import OutputDir
from pipeline.executors.leases import Leases


def node_share(shards: list[Shard], run: RunConfig) -> tuple[list[Shard], list[Shard]]:
    """(this node's shards, the others) for run.node_rank of run.num_nodes; round-robin so every
    node's share is spread over the manifest and a short last shard lands anywhere."""
    mine = [s for s in shards if s.index % run.num_nodes == run.node_rank]
    others = [s for s in shards if s.index % run.num_nodes != run.node_rank] if run.steal else []
    return mine, others


class ShardQueue:
    def __init__(self, out: OutputDir, leases: Leases, mine: list[Shard], others: list[Shard],
                 max_retries: int, done: set[int] | None = None):
        """`done`: the shards already complete, when the caller has read them (out.done_shards())."""
        self.out, self.leases, self.max_retries = out, leases, max_retries
        done = set(out.done_shards()) if done is None else done
        self.todo: deque[Shard] = deque(s for s in mine if s.index not in done)
        self.steal: deque[Shard] = deque(s for s in others if s.index not in done)
        self.busy: list[Shard] = []  # ours, but another live run holds the lease: wait for it
        self.running: set[int] = set()
        self.attempts: dict[int, int] = {}
        self.failed: dict[int, str] = {}
        self._busy_since = 0.0

    def pending(self) -> bool:
        """Anything left to try: ours until done or failed; stolen ones while nobody else holds them."""
        return bool(self.todo or self.steal or self.busy or self.running)

    def next(self) -> Shard | None:
        """A shard whose lease we now hold, or None when nothing can start right now."""
        if self.busy and time.monotonic() - self._busy_since > min(5.0, self.leases.timeout_s / 4):
            self.todo.extend(self.busy)  # re-check whether the other run finished or died
            self.busy.clear()
        for queue, wait in ((self.todo, True), (self.steal, False)):
            while queue:
                shard = queue.popleft()
                if self.out.shard_done(shard.index):
                    continue
                if not self._acquire(shard.index):
                    if wait:
                        self.busy.append(shard)
                        self._busy_since = time.monotonic()
                    continue
                if self.out.shard_done(shard.index):  # finished by another run before we got it
                    self.leases.release(shard.index)
                    continue
                self.running.add(shard.index)
                self.out.reset_shard(shard.index)
                return shard
        return None

    def _acquire(self, shard: int) -> bool:
        try:
            return self.leases.acquire(shard)
        except OSError as e:  # a lease is a small file on the output filesystem: it fills up too
            if (full := self.out.no_space(e, f"taking the lease of shard {shard}")) is not None:
                raise full from None
            raise

    def done(self, shard: Shard) -> None:
        self.running.discard(shard.index)
        self.leases.release(shard.index)

    def lost(self, shard: Shard) -> None:
        """Our lease was taken over (we paused past expiry): the new holder finishes the shard."""
        self.running.discard(shard.index)
        self.leases.release(shard.index)

    def died(self, shard: Shard, error: str) -> None:
        """The worker on `shard` died or raised: retry from the last committed chunk, or give up."""
        self.running.discard(shard.index)
        if (message := disk_full_report(error)) is not None:
            raise DiskFullError(message)  # a retry would only fill the disk again
        n = self.attempts[shard.index] = self.attempts.get(shard.index, 0) + 1
        if n <= self.max_retries:
            self.todo.appendleft(shard)  # keep the lease: nobody else should start it meanwhile
            return
        self.failed[shard.index] = error
        record = {"shard": shard.index, "failed": True, "attempts": n, "error": error, "time": time.time()}
        self.out.write_json(self.out.failed_path(shard.index), record)
        self.leases.release(shard.index)

    def give_up(self, error: str) -> None:
        """No worker can run any more (every slot failed to start): fail whatever is left."""
        for shard in list(self.todo) + list(self.busy):
            if self._acquire(shard.index):  # one another run holds is that run's to finish
                self.attempts[shard.index] = self.max_retries
                self.died(shard, error)
        self.todo.clear()
        self.busy.clear()
        self.steal.clear()
