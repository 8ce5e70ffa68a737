"""One worker: the model loaded once on one device, captioning the shards it is handed.

Used in-process (one device), as a subprocess (`python -m pipeline.executors.worker`, one per local
device) and inside a Ray actor. The process that owns the shard queue holds the leases; a worker only
checks, after each chunk it commits, that its owner still holds the shard's lease, and stops the
shard if not (the run that took the lease over finishes it).

Subprocess protocol: JSON lines. The parent writes the job record, then {"shard": i} or {"exit": true}; the
worker writes {"event": "ready" | "beat" | "chunk" | "done" | "lost" | "error", ...} to the stdout it was
started with, while its own fd 1 is pointed at stderr so stray prints cannot corrupt the stream.

"beat" says the engine still turns out rows (at most one a second): the driver replaces a worker
that stays silent for run.worker_timeout_s (pipeline/executors/pool.py).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable

from pipeline import logs
from pipeline.config import from_dict
from pipeline.data.manifest import Shard, open_manifest
from pipeline.data.output import OutputDir
from pipeline.executors.leases import Leases
from pipeline.model.inspect import inspect_model
from pipeline.shard import open_context, process_shard

BEAT_EVERY_S = 1.0  # the driver needs a beat within run.worker_timeout_s; one a second bounds the traffic


class LeaseLost(Exception):
    """Another run took over the lease of the shard being processed."""


class _BeatingEngine:
    """The context's engine, calling `beat` for every row it streams out: the worker's sign of progress
    comes from the engine itself, so a device call that never returns silences it (a heartbeat thread
    would go on beating)."""

    def __init__(self, engine, beat: Callable[[], None]):
        self._engine, self._beat = engine, beat

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate_stream(self, requests: Iterable):
        for pair in self._engine.generate_stream(requests):
            self._beat()
            yield pair


class ShardWorker:
    def __init__(self, record: dict, device: str, owner: dict, ctx=None):
        if ctx is None:
            cfg = from_dict(record["config"])
            manifest, info = open_manifest(cfg.input, cfg.output.dir), inspect_model(cfg.model)
            ctx = open_context(cfg, manifest, OutputDir(cfg.output.dir, record["fingerprint"]), info,
                               record["model"], device)
        ctx.engine = _BeatingEngine(ctx.engine, self._progressed)
        self.ctx = ctx
        self.leases = Leases(ctx.out.root, ctx.cfg.run.lease_timeout_s, owner)
        self.shards = {s.index: s for s in ctx.manifest.plan(ctx.cfg.output.rows_per_shard)}
        self._on_beat: Callable[[], None] = lambda: None
        self._last_beat = 0.0

    def _progressed(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= BEAT_EVERY_S:
            self._last_beat = now
            self._on_beat()

    def run(self, shard_index: int, on_chunk: Callable[[int, int], None] = lambda rows, errors: None,
            on_beat: Callable[[], None] = lambda: None) -> dict:
        """Caption one shard; {"rows": captioned now, "stats": ...} or {"rows": ..., "lost": True}.
        `on_chunk(rows, errors)` after each chunk commit, `on_beat()` while rows come out in between."""
        shard: Shard = self.shards[shard_index]
        if _listed("LLAVA_BATCH_CRASH_SHARDS", shard_index):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: a shard that kills every worker it meets
        rows = 0

        def on_commit(chunk, results) -> None:  # results: one per (row, prompt)
            nonlocal rows
            rows += chunk.stop - chunk.start
            on_chunk(chunk.stop - chunk.start, sum(r.error is not None for r in results))
            if not self.leases.owns(shard.index):
                raise LeaseLost(f"shard {shard.index}")
            if _hang_here(shard.index):
                threading.Event().wait()  # test hook: a device call that never returns

        self._on_beat = on_beat
        try:
            stats = process_shard(self.ctx, shard, on_commit)
        except LeaseLost:
            return {"rows": rows, "lost": True}
        finally:
            self._on_beat = lambda: None
        return {"rows": rows, "stats": stats}


def _listed(variable: str, shard_index: int) -> bool:
    return str(shard_index) in os.environ.get(variable, "").split(",")


def _hang_here(shard_index: int) -> bool:
    """Test hook: LLAVA_BATCH_HANG_SHARDS lists shards whose worker hangs forever after its first chunk
    commit. With LLAVA_BATCH_HANG_MARKER (a path) only the first worker to get there hangs: it creates
    the marker, so the shard's retry goes through."""
    if not _listed("LLAVA_BATCH_HANG_SHARDS", shard_index):
        return False
    marker = os.environ.get("LLAVA_BATCH_HANG_MARKER")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
    return True


def _exit_on_stop_signals() -> None:
    """SIGTERM / SIGINT reach a worker from a scheduler stopping the whole job, or Ctrl-C reaching the
    process group: exit at once and quietly. The parent owns the leases and the job's state and chunk
    commits are atomic, so a worker stopping anywhere leaves what kill -9 leaves, nothing to undo; a
    traceback from every worker would only bury the parent's one line. A worker stopped alone is
    replaced by the parent like any other that died."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: os._exit(128 + signum))


def _serve(argv: list[str]) -> int:
    _exit_on_stop_signals()
    logs.setup()  # stderr is the parent's: what the worker logs shows up in the job's output
    device, owner_json = argv
    record = json.loads(sys.stdin.readline())  # the parent's own record: _job.json may be another run's
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; fd `proto` carries only the protocol
    lock = threading.Lock()

    def send(**msg) -> None:
        with lock:
            proto.write(json.dumps(msg) + "\n")

    commands: queue.Queue = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            commands.put(json.loads(line))
        os._exit(3)  # the parent is gone (even kill -9): do not outlive it

    threading.Thread(target=read_stdin, daemon=True, name="stdin").start()
    worker = ShardWorker(record, device, json.loads(owner_json))
    send(event="ready", pid=os.getpid())
    while "shard" in (cmd := commands.get()):
        shard = cmd["shard"]
        try:
            result = worker.run(shard, lambda rows, errors, s=shard: send(event="chunk", shard=s, rows=rows,
                                                                          errors=errors),
                                lambda s=shard: send(event="beat", shard=s))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which retries the shard elsewhere
            send(event="error", shard=shard, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
            return 1  # the device may be in a bad state: let the parent start a fresh worker
        send(event="lost" if result.get("lost") else "done", shard=shard, rows=result["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
