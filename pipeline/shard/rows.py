"""A shard's rows on their way in: each chunk's rows as one table, and each row read and decoded
(hashed first under generation.dedup) on the decode threads, with what its read or decode failed of."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline.data.dedup import Reuse, content_hash
from pipeline.data.manifest import Chunk, repair_utf8
from pipeline.data.media import MediaError, decode_media
from pipeline.data.sources import ROW_ERROR, SourceError
from pipeline.shard.context import JobContext


@dataclass
class Item:
    """One manifest row on its way through the pipeline."""

    chunk: Chunk
    pos: int  # position within the chunk
    row: dict
    media: object = None
    error: str | None = None
    sha: str | None = None  # of the media bytes (generation.dedup)
    hint: str | None = None  # the kind column's value
    skipped: bool = False  # not decoded: a lower row of the shard has these bytes (generation.dedup)


def chunk_tables(ctx: JobContext, chunks: list[Chunk]) -> Iterator[tuple[Chunk, pa.Table, dict[int, str]]]:
    """Each chunk's rows as one table, invalid UTF-8 replaced, with {position: why} for those rows."""
    for chunk in chunks:
        batches = [b for _, b in ctx.manifest.iter_rows(chunk.start, chunk.stop)]
        yield chunk, *repair_utf8(pa.Table.from_batches(batches, schema=ctx.manifest.schema))


def read_items(ctx: JobContext, tables: Iterable[tuple[Chunk, pa.Table, dict[int, str]]],
           on_table: Callable) -> Iterator[Item]:
    inp = ctx.cfg.input
    # Only the columns the media source reads become Python objects; the others go to the output
    # as Arrow, so no pass-through value has to survive a conversion.
    wanted = list(dict.fromkeys(c for c in (inp.path_column, inp.bytes_column, inp.kind_column) if c))
    wanted += [ROW_ERROR] if ROW_ERROR in ctx.manifest.schema.names else []
    for chunk, table, bad in tables:
        on_table(chunk, table)
        for pos, row in enumerate(table.select(wanted).to_pylist()):
            yield Item(chunk, pos, row, error=bad.get(pos))


def decode_item(ctx: JobContext, item: Item, reuse: Reuse | None = None) -> Item:
    """Read and decode the row's media; with `reuse` (generation.dedup) hash it first, and skip the
    decode when a lower row of the shard has the same bytes and the rows' prompts are the job's."""
    cfg = ctx.cfg
    item.hint = hint = item.row.get(cfg.input.kind_column) if cfg.input.kind_column else None
    try:
        if item.error is None:  # a row already refused (its input columns) is not opened
            with ctx.source.open(item.row) as f:
                if reuse is not None:
                    item.sha = content_hash(f)
                    item.skipped = not cfg.input.prompt_column and reuse.hashed_before((item.sha, hint),
                                                                                       item.chunk.start + item.pos)
                if not item.skipped:
                    item.media = decode_media(f, video_frames=cfg.generation.video_frames,
                                              max_image_pixels=cfg.input.max_image_pixels, kind_hint=hint,
                                              video_fps=cfg.generation.video_fps)
    except (SourceError, MediaError) as e:
        item.error = str(e)
    except Exception as e:  # noqa: BLE001 - one odd file must not stop the job
        item.error = f"decode error: {type(e).__name__}: {e}"
    if not item.skipped:  # a skipped row keeps its source, in case it must be decoded after all
        item.row = {}  # the chunk table keeps the input columns; drop the bytes early
    return item


def decode_failed(item: Item, e: BaseException) -> Item:
    item.error = f"decode error: {type(e).__name__}: {e}"
    return item


def decode_timed_out(seconds: float) -> Callable[[Item], Item]:
    def timed_out(item: Item) -> Item:  # the stuck thread still holds `item`: a fresh one is the result
        # The hash, once taken, stays: a duplicate that skipped its decode waits for this row's outcome.
        return Item(item.chunk, item.pos, {}, error=f"read/decode timed out after {seconds:g} s", sha=item.sha,
                    hint=item.hint)
    return timed_out
