"""The embedded executor: one process, shards one after another, a progress bar on stderr."""

from __future__ import annotations

import sys

from tqdm import tqdm

from pipeline.manifest import Shard
from pipeline.runner import JobContext, process_shard


def run_local(ctx: JobContext, shards: list[Shard]) -> int:
    """Process every shard without a completion marker; returns the rows captioned by this call."""
    todo = [s for s in shards if not ctx.out.shard_done(s.index)]
    committed = ctx.out.committed_chunks()
    chunk_rows = ctx.cfg.output.chunk_rows
    already = sum(c.stop - c.start for s in todo for c in s.chunks(chunk_rows) if (s.index, c.index) in committed)
    remaining = sum(s.stop - s.start for s in todo) - already
    bar = tqdm(total=remaining, unit="row", file=sys.stderr, disable=not ctx.cfg.run.progress,
               dynamic_ncols=True, desc="captioning")
    errors = 0

    def on_commit(chunk, results) -> None:
        nonlocal errors
        errors += sum(r.error is not None for r in results)
        bar.update(len(results))
        bar.set_postfix(errors=errors, refresh=False)

    with bar:
        for shard in todo:
            process_shard(ctx, shard, on_commit)
    return remaining
