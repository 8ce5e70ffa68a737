"""The fast engine: a fixed set of KV-cache slots kept full from a stream of requests.

    engine = FastEngine(model, processor, gen, device)
    for request, result in engine.generate_stream(requests):   # completion order
        ...

Each step decodes one token for every live row. Live rows are kept in slots [0, k) (a row that
finishes below the last one gets the last one moved into its slot), so a step is [k, 1] and an empty
slot costs nothing; under graph capture every step is [max_batch_size, 1], one shape all run. A row
that stops (EOS or max_output_length) frees its slot; once a quarter of the slots are free the next
queued rows are prefilled into them *inside the next decode step* (their prompt tokens ride in the
same matmuls, decoder.decode_and_prefill), so nobody waits for the slowest caption of a batch,
nothing is padded to the longest prompt, and a refill costs no pass over the weights of its own.
Requests are run through the processor on a helper thread ahead of need (pipeline/engine/feeder.py), so
the engine only waits for input when every slot is empty.

Greedy fp32 output is the same as transformers `generate` (the tests hold it to that).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

import torch
from torch.nn.utils.rnn import pad_sequence

from pipeline import devices
from pipeline.config import GenerationConfig
from pipeline.engine import multimodal
from pipeline.engine.base import Request, Result, stage_error
from pipeline.engine.feeder import Feeder
from pipeline.engine.hf import HFEngine
from pipeline.engine.scheduler import Row, Slots, finish, pick
from pipeline.errors import ConfigError
from pipeline.model import decoder
from pipeline.model.kv_cache import GRAPH_WINDOW_BUCKET, WINDOW_BUCKET, KVCache, attention_dims, window_for

REFILL_FRACTION = 4  # refill once a quarter of the slots are free (W1 on the dev CPU: 1 and 4 slots were even)


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
        # Refill waits for this many free slots (see _run): each refill adds prompt rows to a step,
        # while an empty slot costs nothing (eager) or 1/max_batch_size of a step (graph capture).
        self.refill_at = refill_at or max(1, gen.max_batch_size // REFILL_FRACTION)
        self._decode = devices.graph_compile(decoder.decode_step, device) if compile else decoder.decode_step
        self.window_bucket = GRAPH_WINDOW_BUCKET if compile else WINDOW_BUCKET
        self.compact = not compile
        # busy_s = prefill_s (nothing decoding) + decode_s + mixed_s (decode steps carrying a refill)
        self.stats = {"busy_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "mixed_s": 0.0, "steps": 0,
                      "mixed_steps": 0, "prefill_tokens": 0, "generated_tokens": 0}

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
        feed = Feeder(self.processor, tagged, lookahead=2 * self.cache.slots)
        try:
            exhausted = False
            while True:
                self._compact(slots)
                free = slots.free()
                idle = len(free) == self.cache.slots
                ready = []
                # Refill once refill_at slots are free (fewer when fewer rows are left, any when
                # nothing decodes); block for input only when nothing is decoding.
                if free and not exhausted and (idle or len(free) >= min(self.refill_at, feed.left())):
                    items, exhausted = feed.take(len(free), block=idle)
                    ready = yield from self._screen(items)
                if slots.active():
                    yield from self._step(slots, free, ready)
                elif ready:
                    yield from self._prefill_groups(slots, free, ready)
                elif exhausted:
                    return
        finally:
            feed.close()

    def _screen(self, items: list) -> Iterator:
        """Yields the rows that fail before the model (preprocessing, length); returns the rest."""
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
        return ready

    # -- prefill on its own (nothing is decoding, or a mixed step failed) -------------------------

    def _prefill_groups(self, slots: Slots, free: list[int], ready: list) -> Iterator:
        for group in _by_kind(ready):
            yield from self._prefill_group(slots, free[:len(group)], group)
            free = free[len(group):]

    def _prefill_group(self, slots: Slots, free: list[int], group: list) -> Iterator:
        rows = [self._row(tag, req, enc) for tag, req, enc in group]
        try:
            first = self._prefill(free, group, rows)
        except Exception as e:  # noqa: BLE001 - one bad row must not stop its neighbours
            if len(group) == 1:
                devices.empty_cache(self.device)
                yield group[0][0], group[0][1], Result(error=stage_error("prefill", e))
                return
            for slot, item in zip(free, group, strict=False):
                yield from self._prefill_group(slots, [slot], [item])
            return
        yield from self._place(slots, free, rows, first)

    def _prefill(self, free: list[int], group: list, rows: list[Row]) -> list[int]:
        started = time.perf_counter()
        embeds = multimodal.embed(self.model, group[0][1].kind, [enc for _, _, enc in group], self.dtype, self.device)
        lengths = torch.tensor([len(e) for e in embeds], device=self.device)
        logits = decoder.prefill(self.lm, self.cache, pad_sequence(embeds, batch_first=True), lengths,
                                 torch.tensor(free, device=self.device))
        tokens = pick(logits, rows, self.gen.do_sample, self.gen.temperature, self.gen.top_p)
        self._account("prefill_s", started)
        self.stats["prefill_tokens"] += int(lengths.sum())
        return tokens

    def _place(self, slots: Slots, free: list[int], rows: list[Row], first: list[int]) -> Iterator:
        for slot, row, token in zip(free, rows, first, strict=True):
            slots.place(slot, row)
            done = slots.push(slot, token)
            if done is not None:
                yield row.tag, row.request, self._finish(done)

    # -- a decode step, with the new rows' prefill riding along -----------------------------------

    def _step(self, slots: Slots, free: list[int], ready: list) -> Iterator[tuple[object, Request, Result]]:
        started = time.perf_counter()  # the vision tower included: it is device work too
        new = yield from self._embed(ready)
        active = slots.active()
        width = active[-1] + 1 if self.compact else self.cache.slots  # live rows sit in [0, width)
        last, pos = [0] * width, [0] * width
        for i in active:
            last[i], pos[i] = slots.rows[i].tokens[-1], slots.position(i)
        window = window_for(max(pos), self.cache.max_len, self.window_bucket)
        inputs = (self.lm, self.cache, torch.tensor(last, device=self.device), torch.tensor(pos, device=self.device),
                  window)
        rows = [self._row(tag, req, enc) for tag, req, enc, _ in new]
        try:
            if new:
                targets = torch.tensor(free[:len(new)], device=self.device)
                logits, prompt_logits = decoder.decode_and_prefill(*inputs, [e for *_, e in new], targets)
                first = pick(prompt_logits, rows, self.gen.do_sample, self.gen.temperature, self.gen.top_p)
            else:
                logits = self._decode(*inputs)
            tokens = pick(logits, slots.rows[:width], self.gen.do_sample, self.gen.temperature, self.gen.top_p)
        except Exception as e:  # noqa: BLE001 - a failed step fails the rows in it, not the job
            devices.empty_cache(self.device)
            if new:  # retry apart: the new rows' prefill can then fail row by row
                yield from self._prefill_groups(slots, free, [item[:3] for item in new])
                yield from self._step(slots, [], [])
                return
            for i in active:
                row, slots.rows[i] = slots.rows[i], None
                yield row.tag, row.request, Result(n_prompt_tokens=row.n_prompt, error=stage_error("decode", e))
            return
        self._account("mixed_s" if new else "decode_s", started)
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += bool(new)
        self.stats["prefill_tokens"] += sum(len(e) for *_, e in new)
        for i in active:
            done = slots.push(i, tokens[i])
            if done is not None:
                yield done.tag, done.request, self._finish(done)
        if new:
            yield from self._place(slots, free[:len(new)], rows, first)

    def _compact(self, slots: Slots) -> None:
        """Move rows down until the live ones fill slots [0, k), so a step decodes k rows, not all:
        an empty slot then costs nothing, where it used to cost 1/max_batch_size of every step.
        Off under graph capture, whose step must keep one shape."""
        while self.compact:
            free, active = slots.free(), slots.active()
            if not free or not active or free[0] > active[-1]:
                return
            src, dst = active[-1], free[0]
            self.cache.move(src, dst, slots.position(src))
            slots.move(src, dst)

    def _embed(self, ready: list) -> Iterator:
        """Prompt embeddings of the new rows, one vision-tower call per media kind; a group that
        fails is retried row by row, and the rows that still fail are yielded. Returns
        [(tag, request, encoded, embeddings)]."""
        out = []
        for group in _by_kind(ready):
            try:
                embeds = multimodal.embed(self.model, group[0][1].kind, [enc for *_, enc in group], self.dtype,
                                          self.device)
            except Exception as e:  # noqa: BLE001 - one bad row must not stop its neighbours
                if len(group) == 1:
                    devices.empty_cache(self.device)
                    yield group[0][0], group[0][1], Result(error=stage_error("prefill", e))
                    continue
                for item in group:
                    out += yield from self._embed([item])
                continue
            out += [(*item, e) for item, e in zip(group, embeds, strict=True)]
        return out

    # -- helpers ------------------------------------------------------------------------------------

    def _row(self, tag, req: Request, enc) -> Row:
        return Row(tag, req, len(enc.input_ids), generator=self._generator(req))

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
    _, kv_heads, head_dim = attention_dims(text_config)
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


def _by_kind(ready: list) -> Iterator[list]:
    """The rows of each media kind together: one vision-tower call per kind."""
    for kind in ("image", "video"):
        group = [item for item in ready if item[1].kind == kind]
        if group:
            yield group


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
