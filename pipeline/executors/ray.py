"""Many machines on Ray (optional extra `ray`): one actor per device, shards from the driver's queue.

Ray core actors, not Ray Data: the driver already has the shard queue, leases and retries, and
Ray Data's actor pools deadlocked on a 2-CPU node. An actor that dies is restarted by Ray (which
loads the model again) and its shard goes back to the queue; the driver holds every lease, so a
zombie actor that finishes late only rewrites chunk files with the same rows.

A remote call returns only when the shard ends, so what an actor says meanwhile (chunk commits, beats
while rows come out) goes through a small `ProgressBox` actor the driver empties on every event():
the progress bar moves per chunk and a hung actor is seen by its silence (pool.py), then killed and
restarted by Ray.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable

from pipeline import devices, logs
from pipeline.config import RunConfig
from pipeline.errors import ConfigError


class ProgressBox:
    """A Ray actor: what the shard actors report, (slot, token, kind, message), until the driver takes it."""

    def __init__(self):
        self.items: list = []

    def put(self, item: tuple) -> None:
        self.items.append(item)

    def take(self) -> list:
        items, self.items = self.items, []
        return items


class ShardActor:
    def __init__(self, record: dict, device: str, owner: dict, slot: int, box):
        from pipeline.executors.worker import ShardWorker

        logs.setup()  # an actor is a fresh process: its messages reach the driver through its stderr
        self.worker = ShardWorker(record, device, owner)
        self.slot, self.box = slot, box

    def ready(self) -> int:
        return os.getpid()

    def run(self, shard: int, token: int) -> dict:
        import ray

        def chunk(rows: int, errors: int) -> None:  # waited for: in the box before run() returns
            ray.get(self.box.put.remote((self.slot, token, "chunk", {"rows": rows, "errors": errors})))

        def beat() -> None:  # fire and forget: only its arrival matters
            self.box.put.remote((self.slot, token, "beat", {}))

        return self.worker.run(shard, chunk, beat)


def connect(address: str):
    """ray, initialised; a cluster that cannot be reached is a configuration error (exit 2)."""
    try:
        import ray
    except ImportError:
        raise ConfigError('run.executor = "ray" needs the ray extra: pip install "llava-batch[ray]"') from None
    if not ray.is_initialized():
        ours = signal.getsignal(signal.SIGTERM)
        try:
            if address == "local":  # a private one-machine cluster for this run
                ray.init(include_dashboard=False)
            else:
                ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"run.ray_address = {address!r}: cannot connect to Ray: {e}") from None
        finally:
            # ray.init makes SIGTERM a bare sys.exit; the CLI's handler stops the run cleanly (cli.py).
            if ours is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, ours)
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
    restartable = True

    def __init__(self, record: dict, run: RunConfig, owner: dict, n_shards: int):
        self.ray = connect(run.ray_address)
        kinds = actor_kinds(self.ray, run.devices)
        if kinds == ["cpu"] and run.devices == ["auto"]:
            kinds = ["cpu"] * run.tensor_parallel  # the CPU has no device count: "auto" gives the group its ranks
        # a tensor parallel group of `ranks` devices is one actor
        self.devices = [group.split("+")[0] for group in devices.device_groups(kinds, run.tensor_parallel)]
        self.ranks = run.tensor_parallel
        self.slots = list(range(len(self.devices)))
        self.worker_timeout_s = run.worker_timeout_s
        # Bound Ray's restarts above what shard retries can use up, so only an actor that cannot
        # even start exhausts them (instead of Ray restarting it forever).
        restarts = n_shards * (run.max_retries + 1) + run.max_retries
        self.box = self.ray.remote(ProgressBox).options(num_cpus=0).remote()
        actor = self.ray.remote(ShardActor)
        self.actors = []
        for slot, kind in enumerate(self.devices):
            options, device = devices.ray_actor_options(kind, self.ranks)
            self.actors.append(actor.options(max_restarts=restarts, max_task_retries=0, **options)
                               .remote(record, device, owner, slot, self.box))
        self.pending: dict = {}
        self.queued: deque = deque()
        self.token = dict.fromkeys(self.slots, 0)  # per slot: the run whose box events still count

    def start(self, slot: int) -> None:
        busy = [ref for ref, (s, _) in self.pending.items() if s == slot]
        if busy:  # it never answered: hung. Kill it; Ray restarts it (within max_restarts)
            for ref in busy:
                del self.pending[ref]
            self.token[slot] += 1
            self.ray.kill(self.actors[slot], no_restart=False)
        self.pending[self.actors[slot].ready.remote()] = (slot, "ready")

    def submit(self, slot: int, shard: int) -> None:
        self.token[slot] += 1
        self.pending[self.actors[slot].run.remote(shard, self.token[slot])] = (slot, "run")

    def event(self, timeout: float):
        if not self.queued:
            self._take_box()
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
        self._take_box()  # its chunk events are in the box by now: count them before the shard ends
        self.queued.append((slot, "lost" if value.get("lost") else "done", value))
        return self.queued.popleft()

    def _take_box(self) -> None:
        for slot, token, kind, msg in self.ray.get(self.box.take.remote()):
            if token == self.token[slot]:  # not what a killed actor said about an abandoned run
                self.queued.append((slot, kind, msg))

    def serve(self, drive: Callable[[], None]) -> None:
        drive()  # the actors run elsewhere: nothing to run on this thread

    def close(self) -> None:
        for actor in [*self.actors, self.box]:
            self.ray.kill(actor)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
