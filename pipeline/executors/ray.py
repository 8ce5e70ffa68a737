"""Many machines on Ray (optional extra `ray`): one actor per device, shards from the driver's queue.

Ray core actors, not Ray Data: the driver already has the shard queue, leases and retries, and
Ray Data's actor pools deadlocked on a 2-CPU node. An actor that dies is restarted by Ray (which
loads the model again) and its shard goes back to the queue; the driver holds every lease, so a
zombie actor that finishes late only rewrites chunk files with the same rows.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

from pipeline import devices, logs
from pipeline.config import RunConfig
from pipeline.errors import ConfigError


class ShardActor:
    def __init__(self, record: dict, device: str, owner: dict):
        from pipeline.executors.worker import ShardWorker

        logs.setup()  # an actor is a fresh process: its messages reach the driver through its stderr
        self.worker = ShardWorker(record, device, owner)

    def ready(self) -> int:
        return os.getpid()

    def run(self, shard: int) -> dict:
        return self.worker.run(shard)


def connect(address: str):
    """ray, initialised; a cluster that cannot be reached is a configuration error (exit 2)."""
    try:
        import ray
    except ImportError:
        raise ConfigError('run.executor = "ray" needs the ray extra: pip install "llava-batch[ray]"') from None
    if not ray.is_initialized():
        try:
            if address == "local":  # a private one-machine cluster for this run
                ray.init(include_dashboard=False)
            else:
                ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"run.ray_address = {address!r}: cannot connect to Ray: {e}") from None
    return ray


def actor_kinds(ray, run_devices: list[str]) -> list[str]:
    if run_devices != ["auto"]:
        return [d.split(":")[0] for d in run_devices]
    resources = ray.cluster_resources()
    for kind, name in (("npu", "NPU"), ("cuda", "GPU")):
        if n := int(resources.get(name, 0)):
            return [kind] * n
    return ["cpu"]


class RayPool:
    def __init__(self, record: dict, run: RunConfig, owner: dict, n_shards: int):
        self.ray = connect(run.ray_address)
        self.devices = actor_kinds(self.ray, run.devices)
        self.slots = list(range(len(self.devices)))
        # Bound Ray's restarts above what shard retries can use up, so only an actor that cannot
        # even start exhausts them (instead of Ray restarting it forever).
        restarts = n_shards * (run.max_retries + 1) + run.max_retries
        actor = self.ray.remote(ShardActor)
        self.actors = []
        for kind in self.devices:
            options, device = devices.ray_actor_options(kind)
            self.actors.append(actor.options(max_restarts=restarts, max_task_retries=0, **options)
                               .remote(record, device, owner))
        self.pending: dict = {}
        self.queued: deque = deque()

    def start(self, slot: int) -> None:
        self.pending[self.actors[slot].ready.remote()] = (slot, "ready")

    def submit(self, slot: int, shard: int) -> None:
        self.pending[self.actors[slot].run.remote(shard)] = (slot, "run")

    def event(self, timeout: float):
        if self.queued:
            return self.queued.popleft()
        if not self.pending:
            time.sleep(timeout)
            return None
        done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if not done:
            return None
        slot, what = self.pending.pop(done[0])
        try:
            value = self.ray.get(done[0])
        except self.ray.exceptions.RayTaskError as e:  # a Python error in the shard: the actor lives on
            return slot, "error", {"error": _first_line(e), "alive": True}
        except self.ray.exceptions.RayError as e:  # the actor process died (kill -9, OOM killer, node lost)
            return slot, "died", {"error": _first_line(e), "was_ready": what == "run"}
        if what == "ready":
            return slot, "ready", {"pid": value}
        # Ray reports a shard only when it ends: progress moves per shard.
        self.queued.append((slot, "lost" if value.get("lost") else "done", value))
        return slot, "chunk", {"rows": value["rows"], "errors": value.get("stats", {}).get("errors", 0)}

    def serve(self, drive: Callable[[], None]) -> None:
        drive()  # the actors run elsewhere: nothing to run on this thread

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
