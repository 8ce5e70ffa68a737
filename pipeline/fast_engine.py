"""The fast engine: a fixed set of KV-cache slots kept full from a stream of requests.

    engine = FastEngine(model, processor, gen, device)
    for request, result in engine.generate_stream(requests):   # completion order
        ...

Each step decodes one token for every slot ([max_batch_size, 1], one shape all run). A row that
stops (EOS or max_output_length) frees its slot; once a quarter of the slots are free the next
queued rows are prefilled into them together while the others keep decoding, so nobody waits for
the slowest caption of a batch and nothing is padded to the longest prompt. Requests are run
through the processor on a helper thread ahead of need, so the engine only waits for input when
every slot is empty.

Greedy fp32 output is the same as transformers `generate` (the tests hold it to that).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator

import torch
from torch.nn.utils.rnn import pad_sequence

from pipeline import decoder, devices, multimodal
from pipeline.config import ConfigError, GenerationConfig
from pipeline.engine import HFEngine, Request, Result
from pipeline.kv_cache import GRAPH_WINDOW_BUCKET, WINDOW_BUCKET, KVCache, window_for
from pipeline.scheduler import Row, Slots, finish, pick

_END = object()
GATHER_S = 0.1
REFILL_FRACTION = 4  # refill once a quarter of the slots are free (tuned on W1/W2: 2-5 were close)


class FastEngine:
    def __init__(self, model, processor, gen: GenerationConfig, device: torch.device, *,
                 compile: bool = False, ignore_eos: bool = False, refill_at: int | None = None):
        self.model, self.processor, self.gen, self.device = model, processor, gen, device
        self.dtype = next(model.parameters()).dtype
        self.lm = decoder.language_model(model)
        # The HF engine's generation settings (EOS ids from generation_config, ...) are the contract.
        self.eos_ids = HFEngine(model, processor, gen, device).eos_ids
        self.ignore_eos = ignore_eos
        self.cache = KVCache.allocate(len(self.lm.layers), gen.max_batch_size, self.lm.kv_heads,
                                      gen.max_input_length + gen.max_output_length, self.lm.head_dim,
                                      devices.kv_cache_dtype(device, self.dtype), device)
        # Refill waits for this many free slots (see _run): on the dev CPU a 4-row prefill costs ~11 ms a
        # row, a 1-row one ~18 ms, while an empty slot wastes only 1/max_batch_size of a decode step.
        self.refill_at = refill_at or max(1, gen.max_batch_size // REFILL_FRACTION)
        self._decode = devices.graph_compile(decoder.decode_step, device) if compile else decoder.decode_step
        self.window_bucket = GRAPH_WINDOW_BUCKET if compile else WINDOW_BUCKET
        self.stats = {"busy_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "prefill_tokens": 0,
                      "generated_tokens": 0}

    # -- public API ---------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Result]:
        results: list[Result | None] = [None] * len(requests)
        for i, _, res in self._run(enumerate(requests)):
            results[i] = res
        return results

    def generate_stream(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Result]]:
        for _, req, res in self._run((None, r) for r in requests):
            yield req, res

    # -- the loop -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, tagged: Iterable[tuple[object, Request]]) -> Iterator[tuple[object, Request, Result]]:
        slots = Slots(self.cache.slots, self.gen.max_output_length, self.eos_ids, self.ignore_eos)
        feed = _Feeder(self.processor, tagged, lookahead=2 * self.cache.slots)
        try:
            exhausted = False
            while True:
                free = slots.free()
                idle = len(free) == self.cache.slots
                # Refill in groups: a prefill of one or two rows leaves the matmuls mostly idle, so
                # wait until refill_at slots are free (fewer when fewer rows are left, any when
                # nothing decodes), at the price of a few empty slots in the decode steps meanwhile.
                if free and not exhausted and (idle or len(free) >= min(self.refill_at, feed.left())):
                    # Block for input only when nothing is decoding; else take what is ready.
                    items, exhausted = feed.take(len(free), block=idle)
                    yield from self._admit(slots, free, items)
                if not slots.active():
                    if exhausted:
                        return
                    continue
                yield from self._step(slots)
        finally:
            feed.close()

    def _admit(self, slots: Slots, free: list[int], items: list) -> Iterator[tuple[object, Request, Result]]:
        ready = []
        for tag, req, enc in items:
            if isinstance(enc, Result):
                yield tag, req, enc
            elif len(enc.input_ids) > self.gen.max_input_length:
                n = len(enc.input_ids)
                yield tag, req, Result(n_prompt_tokens=n, error=(
                    f"prompt too long: {n} tokens (prompt + media) > max_input_length {self.gen.max_input_length}"))
            else:
                ready.append((tag, req, enc))
        for kind in ("image", "video"):
            group = [x for x in ready if x[1].kind == kind]
            if group:
                yield from self._prefill_group(slots, free[:len(group)], group)
                free = free[len(group):]

    def _prefill_group(self, slots: Slots, free: list[int], group: list) -> Iterator:
        rows = [Row(tag, req, len(enc.input_ids), generator=self._generator(req)) for tag, req, enc in group]
        try:
            first = self._prefill(free, group, rows)
        except Exception as e:  # noqa: BLE001 - one bad row must not stop its neighbours
            if len(group) == 1:
                devices.empty_cache(self.device)
                yield group[0][0], group[0][1], Result(error=_error("prefill", e))
                return
            for slot, item in zip(free, group, strict=False):
                yield from self._prefill_group(slots, [slot], [item])
            return
        for slot, row, token in zip(free, rows, first, strict=True):
            slots.place(slot, row)
            done = slots.push(slot, token)
            if done is not None:
                yield row.tag, row.request, self._finish(done)

    def _prefill(self, free: list[int], group: list, rows: list[Row]) -> list[int]:
        started = time.perf_counter()
        kind = group[0][1].kind
        embeds = multimodal.embed(self.model, kind, [enc for _, _, enc in group], self.dtype, self.device)
        lengths = torch.tensor([len(e) for e in embeds], device=self.device)
        logits = decoder.prefill(self.lm, self.cache, pad_sequence(embeds, batch_first=True), lengths,
                                 torch.tensor(free, device=self.device))
        tokens = pick(logits, rows, self.gen.do_sample, self.gen.temperature, self.gen.top_p)
        self._account("prefill_s", started)
        self.stats["prefill_tokens"] += int(lengths.sum())
        return tokens

    def _step(self, slots: Slots) -> Iterator[tuple[object, Request, Result]]:
        started = time.perf_counter()
        active = slots.active()
        last = [0] * self.cache.slots
        pos = [0] * self.cache.slots
        for i in active:
            last[i], pos[i] = slots.rows[i].tokens[-1], slots.position(i)
        window = window_for(max(pos), self.cache.max_len, self.window_bucket)
        try:
            logits = self._decode(self.lm, self.cache, torch.tensor(last, device=self.device),
                                  torch.tensor(pos, device=self.device), window)
            tokens = pick(logits, slots.rows, self.gen.do_sample, self.gen.temperature, self.gen.top_p)
        except Exception as e:  # noqa: BLE001 - a failed step fails the rows in it, not the job
            devices.empty_cache(self.device)
            for i in active:
                row, slots.rows[i] = slots.rows[i], None
                yield row.tag, row.request, Result(n_prompt_tokens=row.n_prompt, error=_error("decode", e))
            return
        self._account("decode_s", started)
        self.stats["steps"] += 1
        for i in active:
            done = slots.push(i, tokens[i])
            if done is not None:
                yield done.tag, done.request, self._finish(done)

    # -- helpers ------------------------------------------------------------------------------------

    def _finish(self, row: Row) -> Result:
        self.stats["generated_tokens"] += len(row.tokens)
        return finish(row, self.eos_ids, lambda t: self.processor.tokenizer.decode(t, skip_special_tokens=True))

    def _generator(self, req: Request) -> torch.Generator | None:
        if not self.gen.do_sample:
            return None
        return torch.Generator(self.device).manual_seed(self.gen.seed + req.row_index)

    def _account(self, key: str, started: float) -> None:
        devices.synchronize(self.device)  # an accelerator's queue is not done when the call returns
        seconds = time.perf_counter() - started
        self.stats[key] += seconds
        self.stats["busy_s"] += seconds


def check_cache_fits(text_config, gen: GenerationConfig, device: torch.device, dtype: torch.dtype) -> None:
    """A KV cache the device cannot hold is a configuration error, raised before the weights load.

    It is sized max_batch_size x (max_input_length + max_output_length): a 7B model at the defaults
    (8 x 4224) needs 17 GB, the first thing to shrink on a smaller card.
    """
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    slots, length = gen.max_batch_size, gen.max_input_length + gen.max_output_length
    itemsize = devices.kv_cache_dtype(device, dtype).itemsize
    need = 2 * text_config.num_hidden_layers * slots * kv_heads * length * head_dim * itemsize
    free = devices.free_memory_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ConfigError(
            f"the KV cache for generation.max_batch_size={slots} x (max_input_length + max_output_length)={length} "
            f"needs {need / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free; lower "
            "generation.max_input_length (llava-1.5 prompts are ~650 tokens, llava-v1.6 up to ~3000) "
            "or generation.max_batch_size")


def _error(stage: str, e: BaseException) -> str:
    if devices.is_oom(e):
        return f"device out of memory: {str(e).splitlines()[0][:200]}"
    return f"{stage} failed: {type(e).__name__}: {str(e)[:200]}"


class _Feeder:
    """Pulls requests and runs the processor on them on a helper thread, `lookahead` rows ahead.

    The caller's iterator is consumed on that thread (one consumer at a time), so a slow media
    decode upstream stalls the engine only once every slot has emptied.
    """

    def __init__(self, processor, tagged: Iterable, lookahead: int):
        self.processor, self.q = processor, queue.Queue(maxsize=lookahead)
        self.stop, self.read_all = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(iter(tagged),), daemon=True, name="encode")
        self.thread.start()

    def _fill(self, it) -> None:
        try:
            for tag, req in it:
                try:
                    enc = multimodal.encode(self.processor, req)
                except Exception as e:  # noqa: BLE001 - e.g. an image the processor cannot resize
                    enc = Result(error=_error("preprocess", e))
                if not self._put((tag, req, enc)):
                    return
            if self._put(_END):
                self.read_all.set()
        except BaseException as e:  # noqa: BLE001 - the upstream iterator failed: re-raised in take()
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def left(self) -> int:
        """Rows still to take once the input is read to its end (sys.maxsize until then)."""
        return self.q.qsize() - 1 if self.read_all.is_set() else sys.maxsize

    def take(self, n: int, block: bool) -> tuple[list, bool]:
        """Up to n items; returns (items, exhausted). Without `block`, only what is ready.

        With `block` (every slot empty: nothing to overlap with) it waits for the first item, then
        up to GATHER_S for the rest, so a cold start prefills one batch instead of a trickle.
        """
        items, deadline = [], time.perf_counter() + GATHER_S
        while len(items) < n:
            if not items:  # the first item: as long as it takes, when blocking
                wait = None
            else:
                wait = max(deadline - time.perf_counter(), 0.0) if block else 0.0
            try:
                item = self.q.get(block=block and wait != 0.0, timeout=wait)
            except queue.Empty:
                break
            if not items:
                deadline = time.perf_counter() + GATHER_S
            if item is _END:
                return items, True
            if isinstance(item, BaseException):
                raise item
            items.append(item)
        return items, False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


# Generation settings transformers would apply that the fast engine does not implement.
_HF_ONLY = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": None, "min_length": 0,
            "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "num_beams": 1}


def unsupported(model) -> str | None:
    """Why the fast engine cannot run `model` token-exactly (None: it can)."""
    try:
        decoder.check_supported(model)
    except ValueError as e:
        return str(e)
    gen = model.generation_config
    for name, default in _HF_ONLY.items():
        if getattr(gen, name, default) not in (default, None):
            return f"generation_config.{name} = {getattr(gen, name)!r} is only applied by the hf engine"
    return None


def make_engine(model, processor, gen: GenerationConfig, device: torch.device):
    """The engine `[generation] engine` asks for; "fast" falls back to "hf" (saying why) when it must."""
    if gen.engine == "fast":
        reason = unsupported(model)
        if reason is None:
            return FastEngine(model, processor, gen, device, compile=gen.compile)
        print(f"llava-batch: using the hf engine: {reason}", file=sys.stderr)
    return HFEngine(model, processor, gen, device)
