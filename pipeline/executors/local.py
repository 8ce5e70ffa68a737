"""The embedded executor: one worker inside this process, driven like any other pool.

Shards run on the main thread and the driver loop (progress, shard queue) on a helper thread, so
the driver sees each chunk as it commits; an exception in a shard is re-raised in the caller, as a
crash of the job. An interrupt (SIGINT / SIGTERM) lands on the main thread, in a shard or between
two, and is handed to the driver, which stops, then the leases are released before the interrupt goes
on up. A hung shard cannot be replaced here (pool.py: the run exits, for a rerun).

Why this way round: the model is loaded on the main thread, and once a second thread starts OpenMP
parallel regions, torch's OpenMP runtime (libgomp) has more threads than cores and cuts its workers'
spin-waiting short, so every op run from that other thread pays a wake-up.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from pipeline.executors.worker import ShardWorker
from pipeline.shard import JobContext

_STOP = object()


class InProcessPool:
    restartable = False  # the worker is this process's main thread

    def __init__(self, ctx: JobContext, owner: dict, device: str):
        self.worker = ShardWorker({}, device, owner, ctx=ctx)
        self.slots, self.devices = [0], [device]
        self.worker_timeout_s = ctx.cfg.run.worker_timeout_s
        self.events: queue.Queue = queue.Queue()
        self.events.put((0, "ready", {}))
        self.shards: queue.Queue = queue.Queue()

    def start(self, slot: int) -> None:
        pass  # ready from the start: the model is already loaded

    def submit(self, slot: int, shard: int) -> None:
        self.shards.put(shard)

    def serve(self, drive: Callable[[], None]) -> None:
        """Run `drive` (the driver loop) on a helper thread and the shards it submits here."""
        failure: list[BaseException] = []

        def driver() -> None:
            try:
                drive()
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread below
                failure.append(e)
            finally:
                self.shards.put(_STOP)

        thread = threading.Thread(target=driver, daemon=True, name="driver")
        thread.start()
        try:
            while (shard := self.shards.get()) is not _STOP:
                self._run(shard)
        except BaseException as e:  # an interrupt between two shards: the driver must stop too
            self.events.put((0, "raise", e))
            thread.join()
            raise
        thread.join()
        if failure:
            raise failure[0]

    def _run(self, shard: int) -> None:
        try:
            result = self.worker.run(shard, lambda rows, errors: self.events.put(
                (0, "chunk", {"rows": rows, "errors": errors})), lambda: self.events.put((0, "beat", {})))
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread, which raises it
            self.events.put((0, "raise", e))
            return
        self.events.put((0, "lost" if result.get("lost") else "done", result))

    def event(self, timeout: float):
        try:
            slot, kind, msg = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if kind == "raise":
            raise msg
        return slot, kind, msg

    def close(self) -> None:
        pass
