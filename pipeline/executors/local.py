"""The embedded executor: one worker inside this process, driven like any other pool.

The shard runs on a background thread so the driver loop (progress, lease bookkeeping) sees each
chunk as it commits; an exception in the shard is re-raised in the caller, as a crash of the job.
"""

from __future__ import annotations

import queue
import threading

from pipeline.runner import JobContext
from pipeline.worker import ShardWorker


class InProcessPool:
    def __init__(self, ctx: JobContext, owner: dict, device: str):
        self.worker = ShardWorker({}, device, owner, ctx=ctx)
        self.slots, self.devices = [0], [device]
        self.events: queue.Queue = queue.Queue()
        self.events.put((0, "ready", {}))

    def start(self, slot: int) -> None:
        pass  # ready from the start: the model is already loaded

    def submit(self, slot: int, shard: int) -> None:
        threading.Thread(target=self._run, args=(shard,), daemon=True, name="shard").start()

    def _run(self, shard: int) -> None:
        try:
            result = self.worker.run(shard, lambda rows, errors: self.events.put(
                (0, "chunk", {"rows": rows, "errors": errors})))
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
