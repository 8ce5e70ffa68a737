"""process_shard(): read -> decode -> batch -> generate -> write -> commit, for one shard.

Decoding runs in a thread pool a bounded window ahead of generation, across chunk boundaries,
so the device does not wait on Pillow/PyAV; each row's read + decode has a deadline
(run.decode_timeout_s), after which the row is an error and the job goes on. Every row goes to the
engine's stream tagged with its chunk (`Request.group`): the hf engine's batches never span chunks,
so a chunk's captions depend only on its own rows; the fast engine takes rows one at a time across
chunk boundaries. Results come back in any order, and a chunk commits once all its rows have
results, so chunks stay the plan's fixed row ranges, which exactly-once relies on.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa

from pipeline import devices
from pipeline.config import JobConfig
from pipeline.data.deadline_pool import DeadlinePool, in_order
from pipeline.data.dedup import Reuse, content_hash
from pipeline.data.manifest import Chunk, Manifest, Shard, repair_utf8
from pipeline.data.media import MediaError, decode_media
from pipeline.data.output import OutputDir
from pipeline.data.quality import caption_flags
from pipeline.data.schema import RESULT_FIELDS, hidden_columns, passthrough_name
from pipeline.data.sources import ROW_ERROR, MediaSource, SourceError
from pipeline.data.status import shard_stats
from pipeline.engine import make_engine
from pipeline.engine.base import Engine, Request, Result, Shared
from pipeline.engine.cache_plan import CachePlan, longest_job_prompt, plan_cache, slot_length
from pipeline.errors import ConfigError
from pipeline.logs import log
from pipeline.model import loader
from pipeline.model.inspect import ModelInfo
from pipeline.model.loader import build_prompt


@dataclass
class JobContext:
    cfg: JobConfig
    manifest: Manifest
    out: OutputDir
    info: ModelInfo
    processor: object
    engine: Engine
    model_name: str
    plan: CachePlan
    source: MediaSource = field(init=False)

    def __post_init__(self):
        self.source = MediaSource(self.cfg.input)
        self._prompts: dict[tuple[str, str], str] = {}
        self._specials = _special_tokens(self.processor)

    def special_token_in(self, text: str) -> str | None:
        """The first of the tokenizer's special tokens in `text`: the tokenizer would read it as the
        real control token (an end of turn, a BOS, an image placeholder) even inside the chat template."""
        found = self._specials.search(text) if self._specials else None
        return found.group(0) if found else None

    def prompt_for(self, text: str, kind: str) -> str:
        key = (text, kind)
        if key not in self._prompts:
            self._prompts[key] = build_prompt(self.processor, self.info, text, kind)
        return self._prompts[key]


def _special_tokens(processor) -> re.Pattern | None:
    tok = getattr(processor, "tokenizer", processor)
    tokens = set(getattr(tok, "all_special_tokens", None) or ())
    tokens |= {t.content for t in (getattr(tok, "added_tokens_decoder", None) or {}).values() if t.special}
    tokens.discard("")
    # Longest first, so "<|im_end|>" is reported rather than a shorter token inside it.
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None


def open_context(cfg: JobConfig, manifest: Manifest, out: OutputDir, info: loader.ModelInfo, model_name: str,
                 device_spec: str) -> JobContext:
    """Load the model once on `device_spec` (or a tensor parallel group, "dev+dev+...", of which this
    process is rank 0): in this process, a worker process or a Ray actor. The context's config has
    the plan's slots as generation.max_batch_size."""
    group = device_spec.split("+")
    device = devices.resolve_device(group[0])
    dtype = loader.compute_dtype(info, devices.resolve_dtype(cfg.model.dtype, device), device)
    processor = loader.load_processor(info, cfg.model.trust_remote_code)
    prompt = job_prompt_length(cfg, manifest, info, processor)
    kv_dtype = devices.kv_cache_dtype(device, dtype)
    world = len(group)
    plan_before_loading(cfg, info, prompt, device, dtype, world)
    model, leader = _load(cfg, info, group, device, dtype)
    auto = cfg.generation.max_batch_size == "auto"
    plan = plan_cache(model.config, cfg.generation, prompt, device, kv_dtype,
                      devices.free_memory_bytes(device) if auto else None, world=world)
    log.info(plan.line(device))
    cfg = replace(cfg, generation=replace(cfg.generation, max_batch_size=plan.slots))
    engine = make_engine(model, processor, cfg.generation, device, plan, tp=leader)
    return JobContext(cfg, manifest, out, info, processor, engine, model_name, plan)


def plan_before_loading(cfg: JobConfig, info: ModelInfo, prompt: int, device, dtype, world: int) -> CachePlan:
    """The cache plan against what the weights will leave on `device` (a rank's share of them):
    a cache that cannot fit is a configuration error before they load, not an out-of-memory error
    after minutes of loading."""
    free = devices.free_memory_bytes(device)
    after_weights = None if free is None else free - loader.weight_bytes(info) // world
    return plan_cache(loader.model_config(info), cfg.generation, prompt, device,
                      devices.kv_cache_dtype(device, dtype), after_weights, world=world)


def _load(cfg: JobConfig, info: ModelInfo, group: list[str], device, dtype):
    """(the model, the tensor parallel Leader or None): the whole model, or rank 0's shard with the
    group's other ranks started beside it."""
    if len(group) == 1:
        return loader.load_model(info, device, dtype, cfg.model.trust_remote_code), None
    from pipeline.engine import tp_group
    from pipeline.engine.tp_steps import Leader
    from pipeline.model.tensor_parallel import load_shard

    place, _ = tp_group.start(group, str(info.path), dtype, cfg.run.master_port, cfg.run.worker_timeout_s)
    model = load_shard(loader.MODEL_CLASSES[info.family], info, device, dtype, place)
    return model, Leader(device, dtype, model.config.text_config.hidden_size)


def tensor_parallel_groups(cfg: JobConfig, info: ModelInfo, workers: list[str]) -> list[str]:
    """The local devices cut into run.tensor_parallel-sized groups, one worker each; ConfigError
    (exit 2, before any weight loads) for what the model or the job cannot shard."""
    from pipeline.model.tensor_parallel import check_divides

    size = cfg.run.tensor_parallel
    if cfg.generation.engine != "fast":
        raise ConfigError("run.tensor_parallel > 1 needs generation.engine = \"fast\" (the hf engine runs on one device)")
    check_divides(loader.model_config(info).text_config, size)
    if cfg.run.executor != "local":
        return workers
    if workers == ["cpu"] and cfg.run.devices == ["auto"]:
        workers = ["cpu"] * size  # the CPU has no device count: "auto" gives the group its ranks
    return devices.device_groups(workers, size)


def job_prompt_length(cfg: JobConfig, manifest: Manifest, info: ModelInfo, processor) -> int:
    column = cfg.input.prompt_column
    return longest_job_prompt(processor, info, cfg.generation, manifest.max_bytes(column) if column else None)


def cache_record(cfg: JobConfig, manifest: Manifest, info: ModelInfo) -> dict:
    """The device-independent part of the cache plan, for `_job.json` (each worker's slots are in
    its shards' stats: they depend on its device's memory)."""
    processor = loader.load_processor(info, cfg.model.trust_remote_code)
    prompt, positions = slot_length(job_prompt_length(cfg, manifest, info, processor), cfg.generation)
    return {"max_batch_size": cfg.generation.max_batch_size, "prompt_length": prompt, "slot_length": positions}


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


def _chunk_tables(ctx: JobContext, chunks: list[Chunk]) -> Iterator[tuple[Chunk, pa.Table, dict[int, str]]]:
    """Each chunk's rows as one table, invalid UTF-8 replaced, with {position: why} for those rows."""
    for chunk in chunks:
        batches = [b for _, b in ctx.manifest.iter_rows(chunk.start, chunk.stop)]
        yield chunk, *repair_utf8(pa.Table.from_batches(batches, schema=ctx.manifest.schema))


def _items(ctx: JobContext, tables: Iterable[tuple[Chunk, pa.Table, dict[int, str]]],
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


def _decode(ctx: JobContext, item: Item, reuse: Reuse | None = None) -> Item:
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


def _decode_failed(item: Item, e: BaseException) -> Item:
    item.error = f"decode error: {type(e).__name__}: {e}"
    return item


def _decode_timed_out(seconds: float) -> Callable[[Item], Item]:
    def timed_out(item: Item) -> Item:  # the stuck thread still holds `item`: a fresh one is the result
        # The hash, once taken, stays: a duplicate that skipped its decode waits for this row's outcome.
        return Item(item.chunk, item.pos, {}, error=f"read/decode timed out after {seconds:g} s", sha=item.sha,
                    hint=item.hint)
    return timed_out


class _ChunkWriter:
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
        table = _output_table(self.ctx, chunk, self.tables.pop(k), self.asked.pop(k), results, self.prompts.pop(k),
                              self.media.pop(k))
        meta = {"shard": chunk.shard, "chunk": k, "start": chunk.start, "stop": chunk.stop,
                "seconds": time.perf_counter() - self.started.pop(k),
                # provenance: which process on which host wrote the chunk (ops, and the kill tests)
                "host": socket.gethostname(), "pid": os.getpid()}
        del self.missing[k]
        self.ctx.out.commit_chunk(chunk.shard, k, table, meta)
        self.on_commit(chunk, [r for row in results for r in row])


def _output_table(ctx, chunk, table, asked, results, prompts, media) -> pa.Table:
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


# A prompt a row asks for: (its name in generation.prompts or its index in a list-valued prompt
# column, None for the one prompt of a job; the prompt text).
Prompt = tuple[str | None, str]


def row_prompts(gen, value) -> list[Prompt]:
    """The prompts of a row whose prompt column holds `value` (None without a column): the column's
    text, or each text of its list; generation.prompts; else generation.prompt. A missing or empty
    text is generation.prompt."""
    if isinstance(value, list | tuple):
        return [(str(i), text or gen.prompt) for i, text in enumerate(value)] or [(None, gen.prompt)]
    if value:
        return [(None, value)]
    if gen.prompts:
        return list(gen.prompts.items())
    return [(None, gen.prompt)]


def _row_error(ctx: JobContext, item: Item, text: str) -> str | None:
    """Why a row gets no caption before it reaches the engine (None: it goes on)."""
    if item.error:
        return item.error
    if item.media.kind == "video" and not ctx.info.supports_video:
        return f"unsupported media: video rows need a llava_next_video model, not {ctx.info.family}"
    if (token := ctx.special_token_in(text)) is not None:
        return f"prompt contains the special token {token!r}: control tokens are not accepted in prompt text"
    return None


def _request(ctx: JobContext, item: Item, text: str) -> Request:
    media = item.media
    prompt = ctx.prompt_for(text, media.kind)
    return Request(item.chunk.start + item.pos, prompt, media.kind, image=media.image, frames=media.frames,
                   group=item.chunk.index)


def process_shard(ctx: JobContext, shard: Shard, on_commit: Callable[[Chunk, list[Result]], None]) -> dict:
    """Caption every uncommitted chunk of `shard`, then write its stats marker. Returns the stats."""
    cfg = ctx.cfg
    committed = {c for s, c in ctx.out.committed_chunks() if s == shard.index}
    todo = [c for c in shard.chunks(cfg.output.chunk_rows) if c.index not in committed]
    writer = _ChunkWriter(ctx, on_commit)
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
    pool = DeadlinePool(lambda it: _decode(ctx, it, reuse), cfg.run.decode_workers, cfg.run.decode_timeout_s,
                        failed=_decode_failed, timed_out=_decode_timed_out(cfg.run.decode_timeout_s))
    try:
        items = _items(ctx, _chunk_tables(ctx, todo), remember)
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


def _caption(ctx: JobContext, decoded: Iterable[Item], texts: dict, writer: _ChunkWriter,
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
                    _decode(ctx, item)
                req, error = (None, item.error) if item.error else _checked_request(ctx, item, text, shared)
                if req is None:
                    finish(key, item, which, Result(error=error), None)
                    continue
                pending[id(req)] = (item, which, key)
                yield req

    for req, result in ctx.engine.generate_stream(requests()):
        item, which, key = pending.pop(id(req))
        finish(key, item, which, result, req.prompt)


def _checked_request(ctx: JobContext, item: Item, text: str, shared: Shared | None
                     ) -> tuple[Request | None, str | None]:
    """(the row's request for `text`, None), or (None, why it gets no caption)."""
    try:
        error = _row_error(ctx, item, text)
        return (replace(_request(ctx, item, text), shared=shared), None) if error is None else (None, error)
    except Exception as e:  # noqa: BLE001 - e.g. a chat template that refuses this text
        return None, f"prompt error: {type(e).__name__}: {e}"


def _engine_stats(now: dict, before: dict, wall: float) -> dict:
    """This shard's share of the engine counters; busy_fraction = time computing / wall time."""
    delta = {k: round(v - before.get(k, 0), 4) for k, v in now.items()}
    delta["wall_s"] = round(wall, 3)
    delta["busy_fraction"] = round(delta.get("busy_s", 0.0) / wall, 4) if wall > 0 else 0.0
    return delta
