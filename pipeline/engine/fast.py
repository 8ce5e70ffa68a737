"""The fast engine: a fixed set of KV-cache slots kept full from a stream of requests.

    engine = FastEngine(model, processor, gen, device)
    for request, result in engine.generate_stream(requests):   # completion order
        ...

The cache's slots and their length are the job's memory plan (cache_plan.py). Each step decodes one
token for every live row. Live rows are kept in slots [0, k) (a row that finishes below the last one
gets the last one moved into its slot), so a step is [k, 1] and an empty slot costs nothing; under
graph capture a step replays the graph of the smallest batch bucket >= k (decode_graphs.py). A row
that stops (EOS or max_output_length) frees its slot; once a quarter of the slots are free the next
queued rows are prefilled into them *inside the next decode step* (their prompt tokens ride in the
same matmuls, decoder.decode_and_prefill), so nobody waits for the slowest caption of a batch,
nothing is padded to the longest prompt, and a refill costs no pass over the weights of its own.
Requests are run through the processor on a helper thread ahead of need (pipeline/engine/feeder.py), so
the engine only waits for input when every slot is empty.

A step goes as nano-vllm's: the scheduler (scheduler.py) decides refills and moves, the runner
(runner.py) builds the step's tensors and runs the decoder, and this engine coordinates them, one
`Sequence` (sequence.py) per row. Greedy fp32 output is the same as transformers `generate` (the
tests hold it to that).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Iterator

import torch

from pipeline import devices
from pipeline.config import GenerationConfig
from pipeline.engine.base import Request, Result, caption_result, eos_ids, prompt_too_long, stage_error
from pipeline.engine.cache_plan import CachePlan, plan_for_model
from pipeline.engine.feeder import Feeder
from pipeline.engine.runner import Runner
from pipeline.engine.scheduler import Scheduler
from pipeline.engine.sequence import Done, Sequence, by_kind, link_shared, shared_prefix
from pipeline.engine.tp_steps import Leader

REFILL_FRACTION = 4  # refill once a quarter of the slots are free (benchmarks/RESULTS.md: refill threshold)


class FastEngine:
    def __init__(self, model, processor, gen: GenerationConfig, device: torch.device, *,
                 compile: bool = False, ignore_eos: bool = False, refill_at: int | None = None,
                 plan: CachePlan | None = None, tp: Leader | None = None):
        self.processor, self.gen, self.device = processor, gen, device
        self.plan = plan or plan_for_model(model, gen, device)
        self.runner = Runner(model, self.plan, gen, device, compile=compile, tp=tp)
        self.cache = self.runner.cache
        self.eos_ids = eos_ids(model.generation_config, processor.tokenizer)
        self.ignore_eos = ignore_eos
        self.refill_at = refill_at or max(1, self.plan.slots // REFILL_FRACTION)
        self.compact = True  # always, with or without graphs; a test turns it off to show it changes nothing
        # busy_s = prefill_s (nothing decoding) + decode_s + mixed_s (decode steps carrying a refill)
        self.stats = {"busy_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "mixed_s": 0.0, "steps": 0,
                      "mixed_steps": 0, "prefill_tokens": 0, "shared_prefix_tokens": 0, "generated_tokens": 0,
                      "media_encoded": 0}

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
    def _run(self, tagged: Iterable[tuple[object, Request]]) -> Iterator[Done]:
        sched = Scheduler(self.cache.slots, self.gen.max_output_length, self.eos_ids,
                          ignore_eos=self.ignore_eos, refill_at=self.refill_at, max_refill=self.plan.prefill_rows,
                          compact=self.compact, stop_on_repetition=self.gen.stop_on_repetition)
        feed = Feeder(self.processor, tagged, lookahead=2 * self.cache.slots)
        try:
            exhausted = False
            while True:
                for move in sched.compaction():
                    self.runner.move(*move)
                take, idle = sched.refill(exhausted, feed.left)
                new = []
                if take:
                    items, exhausted = feed.take(take, block=idle)
                    new = yield from self._sequences(items)
                if not idle:
                    yield from self._step(sched, new)
                elif new:
                    yield from self._prefill(sched, new)
                elif exhausted:
                    return
        finally:
            feed.close()

    def _sequences(self, items: list) -> Generator[Done, None, list[Sequence]]:
        """Yields the rows that fail before the model (preprocessing, length); returns the rest."""
        ready = []
        for tag, req, enc in items:
            if isinstance(enc, Result):
                yield tag, req, enc
            elif len(enc.input_ids) > self.plan.prompt_length:
                yield tag, req, prompt_too_long(len(enc.input_ids), self.plan.prompt_length,
                                                self.plan.prompt_length < self.gen.max_input_length)
            else:
                ready.append(Sequence(tag, req, enc, len(enc.input_ids)))
        link_shared(ready)
        return ready

    # -- prefill on its own (nothing is decoding, or a mixed step failed) -------------------------

    def _prefill(self, sched: Scheduler, seqs: list[Sequence]) -> Iterator[Done]:
        free = sched.free()
        for group in by_kind(seqs):
            free = sched.assign(group, free)
            placed = yield from self._rowwise(group, self._prefill_rows)
            yield from self._finished(sched.admit(placed))

    def _prefill_rows(self, seqs: list[Sequence]) -> list[int]:
        started = time.perf_counter()
        self._seed(seqs)
        self._count_media(seqs)
        first = self.runner.prefill(seqs)
        self._account("prefill_s", started)
        self._count_prefill(seqs)
        return first

    # -- a decode step, with the new rows' prefill riding along -----------------------------------

    def _step(self, sched: Scheduler, new: list[Sequence]) -> Iterator[Done]:
        started = time.perf_counter()  # the vision tower included: it is device work too
        new = yield from self._embedded(new)
        if new:
            sched.assign(new, sched.free())
        active, rows = sched.running()
        inputs = self.runner.step_inputs(rows)
        try:
            self._seed(new)
            tokens, first = self.runner.step(inputs, rows, new)
        except Exception as e:  # noqa: BLE001 - a failed step fails the rows in it, not the job
            devices.empty_cache(self.device)
            if new:  # retry apart: the new rows' prefill can then fail row by row
                yield from self._prefill(sched, new)
                yield from self._step(sched, [])
                return
            for seq in sched.evict(active):
                yield seq.done(Result(n_prompt_tokens=seq.n_prompt, error=stage_error("decode", e)))
            return
        self._account("mixed_s" if new else "decode_s", started)
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += bool(new)
        self._count_prefill(new)
        yield from self._finished(sched.postprocess(active, tokens))
        yield from self._finished(sched.admit(zip(new, first, strict=True)))

    def _embedded(self, seqs: list[Sequence]) -> Generator[Done, None, list[Sequence]]:
        """The new rows with their prompt embeddings, one vision-tower call per media kind; yields
        the rows that fail."""
        out = []
        for group in by_kind(seqs):
            self._count_media(group)
            for seq, embeds in (yield from self._rowwise(group, self.runner.embed)):
                seq.embeds = embeds
                out.append(seq)
        return out

    # -- helpers ------------------------------------------------------------------------------------

    def _rowwise(self, group: list[Sequence], run: Callable[[list[Sequence]], list]
                 ) -> Generator[Done, None, list[tuple[Sequence, object]]]:
        """`run` on the group (one value per row), else row by row if it raises; yields the rows
        that fail alone, returns the others with their values."""
        try:
            return list(zip(group, run(group), strict=True))
        except Exception as e:  # noqa: BLE001 - one bad row must not stop its neighbours
            if len(group) == 1:
                devices.empty_cache(self.device)
                yield group[0].done(Result(error=stage_error("prefill", e)))
                return []
        out = []
        for seq in group:
            out += yield from self._rowwise([seq], run)
        return out

    def _finished(self, seqs: list[Sequence]) -> Iterator[Done]:
        for seq in seqs:
            self.stats["generated_tokens"] += len(seq.tokens)
            yield seq.done(caption_result(seq.tokens, seq.n_prompt, self.eos_ids, self.processor.tokenizer,
                                          self.gen.stop_on_repetition))

    def _count_media(self, seqs: list[Sequence]) -> None:
        """Media sent to the vision tower: once for the prompts of one media (multimodal.embed)."""
        self.stats["media_encoded"] += len({id(s.encoded.pixels) for s in seqs})

    def _count_prefill(self, seqs: list[Sequence]) -> None:
        shared = sum(shared_prefix(s, seqs) for s in seqs)
        self.stats["prefill_tokens"] += sum(s.n_prompt for s in seqs) - shared
        self.stats["shared_prefix_tokens"] += shared

    def _seed(self, seqs: list[Sequence]) -> None:
        """A fresh generator per row and attempt: a row retried samples what it would have the first time."""
        if self.gen.do_sample:
            for seq in seqs:
                seed = self.gen.seed + seq.request.row_index
                seq.generator = torch.Generator(self.device).manual_seed(seed)

    def _account(self, key: str, started: float) -> None:
        devices.synchronize(self.device)  # an accelerator's queue is not done when the call returns
        seconds = time.perf_counter() - started
        self.stats[key] += seconds
        self.stats["busy_s"] += seconds
