"""Executors: who runs `shard -> process_shard`. All share one driver loop (pool.drive).

- one local device: the model in this process (InProcessPool), as a plain single-device run;
- several local devices: one worker process per device (ProcPool);
- run.executor = "ray": one Ray actor per device across a cluster (RayPool).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import RunConfig
from pipeline.data.manifest import Shard
from pipeline.data.output import OutputDir
from pipeline.executors.leases import Leases, new_owner
from pipeline.executors.pool import Pool, Progress, drive
from pipeline.executors.shard_queue import ShardQueue


def make_pool(run: RunConfig, record: dict, workers: list[str], n_shards: int, load: Callable
              ) -> tuple[Pool, dict]:
    """The pool for this job and the lease owner it works for. Built before anything is written,
    so an unreachable Ray cluster or a model that fails to load in-process stops the job cleanly."""
    owner = new_owner()
    if run.executor == "ray":
        from pipeline.executors.ray import RayPool

        return RayPool(record, run, owner, n_shards), owner
    if len(workers) > 1:
        from pipeline.executors.procs import ProcPool

        return ProcPool(record, workers, owner), owner
    from pipeline.executors.local import InProcessPool

    return InProcessPool(load(workers[0]), owner, workers[0]), owner


def run_pool(pool: Pool, owner: dict, run: RunConfig, out: OutputDir, mine: list[Shard], others: list[Shard],
             chunk_rows: int) -> tuple[int, dict[int, str]]:
    """(rows captioned by this run, {shard: error} of shards that failed every retry)."""
    done = set(out.done_shards())  # one read of the markers serves the queue and the progress total
    with Leases(out.root, run.lease_timeout_s, owner) as leases:
        queue = ShardQueue(out, leases, mine, others, run.max_retries, done)
        progress = Progress(_remaining(out, mine + others, chunk_rows, done), run.progress)
        try:
            pool.serve(lambda: drive(pool, queue, progress, run.max_retries))
        finally:
            progress.close()
    return progress.rows, queue.failed


def _remaining(out: OutputDir, shards: list[Shard], chunk_rows: int, done: set[int]) -> int:
    committed = out.committed_chunks()
    return sum(c.stop - c.start for s in shards if s.index not in done
               for c in s.chunks(chunk_rows) if (s.index, c.index) not in committed)
