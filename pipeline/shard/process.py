"""process_shard(): read -> decode -> batch -> generate -> write -> commit, for one shard.

Decoding runs in a thread pool a bounded window ahead of generation, across chunk boundaries,
so the device does not wait on Pillow/PyAV; each row's read + decode has a deadline
(run.decode_timeout_s), after which the row is an error and the job goes on. Every row goes to the
engine's stream tagged with its chunk (`Request.group`): the hf engine's batches never span chunks,
so a chunk's captions depend only on its own rows; the fast engine takes rows one at a time across
chunk boundaries. Results come back in any order, and a chunk commits once all its rows have all
their results (one per prompt), so chunks stay the plan's fixed row ranges, which exactly-once
relies on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import pyarrow as pa

from pipeline.data.deadline_pool import DeadlinePool, in_order
from pipeline.data.dedup import Reuse
from pipeline.data.manifest import Chunk, Shard
from pipeline.data.status import shard_stats
from pipeline.engine.base import Request, Result, Shared
from pipeline.shard.context import JobContext
from pipeline.shard.requests import Prompt, checked_request, row_prompts
from pipeline.shard.rows import Item, chunk_tables, decode_failed, decode_item, decode_timed_out, read_items
from pipeline.shard.writer import ChunkWriter


def process_shard(ctx: JobContext, shard: Shard, on_commit: Callable[[Chunk, list[Result]], None]) -> dict:
    """Caption every uncommitted chunk of `shard`, then write its stats marker. Returns the stats."""
    cfg = ctx.cfg
    committed = {c for s, c in ctx.out.committed_chunks() if s == shard.index}
    todo = [c for c in shard.chunks(cfg.output.chunk_rows) if c.index not in committed]
    writer = ChunkWriter(ctx, on_commit)
    prompt_col = cfg.input.prompt_column
    texts: dict[int, list[list[Prompt]]] = {}

    def remember(chunk: Chunk, table: pa.Table) -> None:
        values = table.column(prompt_col).to_pylist() if prompt_col else [None] * table.num_rows
        texts[chunk.index] = [row_prompts(cfg.generation, v) for v in values]
        writer.open(chunk, table, texts[chunk.index])

    window = max(2 * cfg.generation.max_batch_size, 2 * cfg.run.decode_workers)
    engine_before = dict(ctx.engine.stats)
    reuse = Reuse() if cfg.generation.dedup else None
    started = time.perf_counter()
    pool = DeadlinePool(lambda it: decode_item(ctx, it, reuse), cfg.run.decode_workers, cfg.run.decode_timeout_s,
                        failed=decode_failed, timed_out=decode_timed_out(cfg.run.decode_timeout_s))
    try:
        items = read_items(ctx, chunk_tables(ctx, todo), remember)
        _caption(ctx, in_order(pool, items, window), texts, writer, reuse)
    finally:
        pool.close()
    stats = shard_stats(ctx.out, shard.index, shard.stop - shard.start)
    if engine_before:
        stats["engine"] = _engine_stats(ctx.engine.stats, engine_before, time.perf_counter() - started)
    stats["cache_plan"] = ctx.plan.describe()
    if reuse is not None:
        stats["dedup_reused_rows"] = reuse.reused  # this run's: results answered without the engine
        stats["dedup_skipped_decodes"] = reuse.skipped
    ctx.out.commit_shard(shard.index, stats)
    return stats


def _caption(ctx: JobContext, decoded: Iterable[Item], texts: dict, writer: ChunkWriter,
             reuse: Reuse | None = None) -> None:
    """Rows flow through the engine's stream, one request per (row, prompt), and come back in any
    order of completion; a chunk commits once every one of its rows has all its results, so chunk
    boundaries (and exactly-once) hold. The prompts of one row share its media (Request.shared).
    With `reuse` (generation.dedup) a (row, prompt) whose media bytes and prompt an earlier row of
    the shard had takes that row's outcome, its caption or its error.

    The fast engine pulls `requests()` on its own feeder thread, hence the lock around the writer.
    """
    lock = threading.Lock()
    pending: dict[int, tuple[Item, int, tuple | None]] = {}

    def done(item: Item, which: int, result: Result, prompt: str | None, media) -> None:
        with lock:
            writer.put(item, which, result, prompt, media)
            if writer.complete(item.chunk):
                writer.commit(item.chunk)

    def finish(key: tuple | None, item: Item, which: int, result: Result, prompt: str | None) -> None:
        done(item, which, result, prompt, item.media)
        if key is not None:
            with lock:
                waiting = reuse.finished(key, (result, prompt, item.media))
            for other, other_which, first in waiting:
                done(other, other_which, replace(result, dedup_of=first), prompt, item.media)

    def reused(key: tuple, item: Item, which: int) -> bool:
        """Whether an earlier row has the key (its outcome taken now, or once it is in)."""
        with lock:
            first = reuse.first_row(key, item.chunk.start + item.pos)
            ready = None if first is None else reuse.wait(key, (item, which, first))
        if ready is not None:
            result, prompt, media = ready
            done(item, which, replace(result, dedup_of=first), prompt, media)
        return first is not None

    def requests() -> Iterator[Request]:
        for item in decoded:
            asked = texts[item.chunk.index][item.pos]
            shared = Shared((item.chunk.index, item.pos), len(asked)) if len(asked) > 1 else None
            for which, (_, text) in enumerate(asked):
                key = (item.sha, item.hint, text) if reuse is not None and item.sha is not None else None
                if key is not None and reused(key, item, which):
                    continue
                if item.skipped:  # no earlier row answers it after all: decode it here
                    item.skipped = False
                    decode_item(ctx, item)
                req, error = (None, item.error) if item.error else checked_request(ctx, item, text, shared)
                if req is None:
                    finish(key, item, which, Result(error=error), None)
                    continue
                pending[id(req)] = (item, which, key)
                yield req

    for req, result in ctx.engine.generate_stream(requests()):
        item, which, key = pending.pop(id(req))
        finish(key, item, which, result, req.prompt)


def _engine_stats(now: dict, before: dict, wall: float) -> dict:
    """This shard's share of the engine counters; busy_fraction = time computing / wall time."""
    delta = {k: round(v - before.get(k, 0), 4) for k, v in now.items()}
    delta["wall_s"] = round(wall, 3)
    delta["busy_fraction"] = round(delta.get("busy_s", 0.0) / wall, 4) if wall > 0 else 0.0
    return delta
