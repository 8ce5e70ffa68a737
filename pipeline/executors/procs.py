"""Worker processes on this host, one per device (data parallel).

Each worker is a fresh `python -m pipeline.executors.worker` process with its accelerator made the
only visible one in its environment, set before torch starts, so nothing here touches device state
and nothing is forked from a process that has. A worker that dies is started again; one that hangs
is killed first (SIGKILL: it may be stuck in a device call that no gentler signal interrupts).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pipeline
from pipeline import devices

_ROOT = str(Path(pipeline.__file__).resolve().parent.parent)


class ProcPool:
    restartable = True

    def __init__(self, record: dict, device_list: list[str], owner: dict):
        self.record, self.devices, self.owner = record, device_list, owner
        self.slots = list(range(len(device_list)))
        self.worker_timeout_s = float(record["config"]["run"]["worker_timeout_s"])
        self.procs: dict[int, subprocess.Popen] = {}
        self.killed: list[subprocess.Popen] = []  # replaced while hung: reaped at close
        self.gen = dict.fromkeys(self.slots, 0)
        self.events: queue.Queue = queue.Queue()
        self.cpu_workers = sum(d == "cpu" for d in device_list)

    def start(self, slot: int) -> None:
        old = self.procs.get(slot)
        if old is not None and old.poll() is None:  # still running: hung, the driver is replacing it
            old.kill()
            self.killed.append(old)
        extra, device = devices.worker_env(self.devices[slot], self.cpu_workers)
        env = {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.executors.worker", device, json.dumps(self.owner)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self.gen[slot] += 1
        self.procs[slot] = proc
        threading.Thread(target=self._read, args=(slot, self.gen[slot], proc), daemon=True,
                         name=f"worker-{slot}").start()
        self._send(proc, self.record)

    def _read(self, slot: int, gen: int, proc: subprocess.Popen) -> None:
        was_ready = False
        for line in proc.stdout:
            msg = json.loads(line)
            was_ready = was_ready or msg["event"] == "ready"
            self.events.put((slot, gen, msg["event"], msg))
        code = proc.wait()
        self.events.put((slot, gen, "died", {"error": _describe_exit(code), "was_ready": was_ready}))

    @staticmethod
    def _send(proc: subprocess.Popen, msg: dict) -> None:
        try:
            proc.stdin.write(json.dumps(msg) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died; its reader thread reports that

    def submit(self, slot: int, shard: int) -> None:
        self._send(self.procs[slot], {"shard": shard})

    def event(self, timeout: float):
        while True:
            try:
                slot, gen, kind, msg = self.events.get(timeout=timeout)
            except queue.Empty:
                return None
            if gen == self.gen[slot]:  # drop what a replaced worker said last
                return slot, kind, msg

    def serve(self, drive: Callable[[], None]) -> None:
        drive()  # the workers are other processes: nothing to run on this thread

    def close(self) -> None:
        for proc in self.procs.values():
            self._send(proc, {"exit": True})
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.killed:
            try:  # SIGKILL waits for a call stuck in the kernel (a dead mount) to return: do not wait long
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
