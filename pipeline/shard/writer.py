"""A chunk's results collected in row and prompt order, and its output table committed once every
row has all of them (the chunk is the commit unit; exactly-once relies on it)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pyarrow as pa

from pipeline.data.manifest import Chunk
from pipeline.data.quality import caption_flags
from pipeline.data.schema import RESULT_FIELDS, hidden_columns, passthrough_name
from pipeline.engine.base import Result
from pipeline.shard.context import JobContext
from pipeline.shard.requests import Prompt
from pipeline.shard.rows import Item


class ChunkWriter:
    """Collects one chunk's results, one per (row, prompt), and commits the chunk when every row has
    all of them: the chunk stays the commit unit with several prompts a row."""

    def __init__(self, ctx: JobContext, on_commit: Callable[[Chunk, list[Result]], None]):
        self.ctx, self.on_commit = ctx, on_commit
        self.tables: dict[int, pa.Table] = {}
        self.asked: dict[int, list[list[Prompt]]] = {}  # each row's (name, text) prompts
        self.results: dict[int, list[list]] = {}
        self.prompts: dict[int, list[list]] = {}  # each result's full prompt, as the model saw it
        self.media: dict[int, list] = {}  # (frames, frame_times) of video rows
        self.missing: dict[int, int] = {}
        self.started: dict[int, float] = {}

    def open(self, chunk: Chunk, table: pa.Table, asked: list[list[Prompt]]) -> None:
        k = chunk.index
        self.tables[k], self.asked[k] = table, asked
        self.results[k] = [[None] * len(a) for a in asked]
        self.prompts[k] = [[None] * len(a) for a in asked]
        self.media[k] = [(None, None)] * len(asked)
        self.missing[k] = sum(map(len, asked))
        self.started[k] = time.perf_counter()

    def put(self, item: Item, which: int, result: Result, prompt: str | None, media=None) -> None:
        """`media`: what the result was made from (a deduplicated row's is its first row's)."""
        k = item.chunk.index
        if self.results[k][item.pos][which] is None:
            self.missing[k] -= 1
        self.results[k][item.pos][which] = result
        self.prompts[k][item.pos][which] = prompt
        if media is not None and media.kind == "video":
            self.media[k][item.pos] = (int(media.frames.shape[0]), media.frame_times)

    def complete(self, chunk: Chunk) -> bool:
        return self.missing[chunk.index] == 0

    def commit(self, chunk: Chunk) -> None:
        k = chunk.index
        results = self.results.pop(k)
        table = output_table(self.ctx, chunk, self.tables.pop(k), self.asked.pop(k), results, self.prompts.pop(k),
                              self.media.pop(k))
        meta = {"shard": chunk.shard, "chunk": k, "start": chunk.start, "stop": chunk.stop,
                "seconds": time.perf_counter() - self.started.pop(k),
                # provenance: which process on which host wrote the chunk (ops, and the kill tests)
                "host": socket.gethostname(), "pid": os.getpid()}
        del self.missing[k]
        self.ctx.out.commit_chunk(chunk.shard, k, table, meta)
        self.on_commit(chunk, [r for row in results for r in row])


def output_table(ctx, chunk, table, asked, results, prompts, media) -> pa.Table:
    """One output row per (manifest row, prompt), in row order then prompt order."""
    hidden = [c for c in hidden_columns(ctx.cfg.input.bytes_column) if c in table.column_names]
    if hidden:
        table = table.drop_columns(hidden)
    table = table.rename_columns([passthrough_name(n) for n in table.column_names])
    rows = [pos for pos, a in enumerate(asked) for _ in a]
    table = table.take(pa.array(rows, type=pa.int64()))
    flat = [r for row in results for r in row]
    values = {
        "row_index": [chunk.start + pos for pos in rows],
        "caption": [r.caption for r in flat],
        "status": ["error" if r.error else "ok" for r in flat],
        "error": [r.error for r in flat],
        "n_prompt_tokens": [r.n_prompt_tokens for r in flat],
        "n_output_tokens": [r.n_output_tokens for r in flat],
        "finish_reason": [r.finish_reason for r in flat],
        "frames": [media[pos][0] for pos in rows],
        "frame_times": [media[pos][1] for pos in rows],
        "prompt": [p for row in prompts for p in row],
        "prompt_name": [name for a in asked for name, _ in a],
        "model": [ctx.model_name] * len(flat),
        "flags": [caption_flags(r.caption, r.finish_reason, not r.error) for r in flat],
        "dedup_of": [r.dedup_of for r in flat],
    }
    for f in RESULT_FIELDS:
        table = table.append_column(f, pa.array(values[f.name], type=f.type))
    return table
