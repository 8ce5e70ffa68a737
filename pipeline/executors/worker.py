"""One worker: the model loaded once on one device, captioning the shards it is handed.

Used in-process (one device), as a subprocess (`python -m pipeline.executors.worker`, one per local
device) and inside a Ray actor. The process that owns the shard queue holds the leases; a worker only
checks, after each chunk it commits, that its owner still holds the shard's lease, and stops the
shard if not (the run that took the lease over finishes it).

Subprocess protocol: JSON lines. The parent writes the job record, then {"shard": i} or {"exit": true}; the
worker writes {"event": "ready" | "chunk" | "done" | "lost" | "error", ...} to the stdout it was
started with, while its own fd 1 is pointed at stderr so stray prints cannot corrupt the stream.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from pipeline import logs
from pipeline.config import from_dict
from pipeline.data.manifest import Shard, open_manifest
from pipeline.data.output import OutputDir
from pipeline.executors.leases import Leases
from pipeline.model.loader import inspect_model
from pipeline.shard import open_context, process_shard


class LeaseLost(Exception):
    """Another run took over the lease of the shard being processed."""


class ShardWorker:
    def __init__(self, record: dict, device: str, owner: dict, ctx=None):
        if ctx is None:
            cfg = from_dict(record["config"])
            manifest, info = open_manifest(cfg.input), inspect_model(cfg.model)
            ctx = open_context(cfg, manifest, OutputDir(cfg.output.dir), info, record["model"], device)
        self.ctx = ctx
        self.leases = Leases(ctx.out.root, ctx.cfg.run.lease_timeout_s, owner)
        self.shards = {s.index: s for s in ctx.manifest.plan(ctx.cfg.output.rows_per_shard)}

    def run(self, shard_index: int, on_chunk: Callable[[int, int], None] = lambda rows, errors: None) -> dict:
        """Caption one shard; {"rows": captioned now, "stats": ...} or {"rows": ..., "lost": True}."""
        shard: Shard = self.shards[shard_index]
        if str(shard_index) in os.environ.get("LLAVA_BATCH_CRASH_SHARDS", "").split(","):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: a shard that kills every worker it meets
        rows = 0

        def on_commit(chunk, results) -> None:
            nonlocal rows
            rows += len(results)
            on_chunk(len(results), sum(r.error is not None for r in results))
            if not self.leases.owns(shard.index):
                raise LeaseLost(f"shard {shard.index}")

        try:
            stats = process_shard(self.ctx, shard, on_commit)
        except LeaseLost:
            return {"rows": rows, "lost": True}
        return {"rows": rows, "stats": stats}


def _serve(argv: list[str]) -> int:
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
                                                                          errors=errors))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which retries the shard elsewhere
            send(event="error", shard=shard, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
            return 1  # the device may be in a bad state: let the parent start a fresh worker
        send(event="lost" if result.get("lost") else "done", shard=shard, rows=result["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
