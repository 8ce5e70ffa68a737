"""Batched generation on decoded media with transformers `generate`. No file I/O here.

This is the reference engine: same inputs, same greedy outputs as calling `generate` by hand.
A batch that runs the device out of memory is retried in halves before rows get an error; in a
stream, a batch that fails otherwise is retried row by row, so only the rows that fail alone err.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch

from pipeline import devices
from pipeline.config import GenerationConfig
from pipeline.engine.base import (
    Request,
    Result,
    caption_result,
    eos_ids,
    generation_failed,
    prompt_too_long,
    stage_error,
)
from pipeline.engine.batching import batches
from pipeline.engine.cache_plan import plan_for_model


class HFEngine:
    def __init__(self, model, processor, gen: GenerationConfig, device: torch.device):
        if gen.max_batch_size == "auto":  # batches as many rows as the fast engine would hold slots for
            gen = replace(gen, max_batch_size=plan_for_model(model, gen, device).slots)
        self.model, self.processor, self.gen, self.device = model, processor, gen, device
        self.dtype = next(model.parameters()).dtype
        self.generation_config = self._generation_config()
        self.eos_ids = eos_ids(self.generation_config, processor.tokenizer)
        self.stats: dict[str, float] = {}  # no counters: the shard stats get no engine section

    def _generation_config(self):
        cfg = copy.deepcopy(self.model.generation_config)
        cfg.max_new_tokens = self.gen.max_output_length
        cfg.max_length = None
        cfg.do_sample = self.gen.do_sample
        cfg.temperature = self.gen.temperature if self.gen.do_sample else None
        cfg.top_p = self.gen.top_p if self.gen.do_sample else None
        cfg.top_k = None
        if cfg.eos_token_id is None:
            cfg.eos_token_id = self.processor.tokenizer.eos_token_id
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self.processor.tokenizer.pad_token_id
        return cfg

    def encode(self, requests: list[Request]):
        images = [r.image for r in requests if r.kind == "image"] or None
        videos = [r.frames for r in requests if r.kind == "video"] or None
        return self.processor(text=[r.prompt for r in requests], images=images, videos=videos,
                              padding=True, return_tensors="pt")

    def generate_stream(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Result]]:
        """Requests in batches (pipeline/engine/batching.py), each batch's results as it completes."""
        for batch in batches(requests, self.gen.max_batch_size):
            yield from zip(batch, self._generate_or_fail(batch), strict=True)

    def _generate_or_fail(self, requests: list[Request]) -> list[Result]:
        try:
            return self.generate(requests)
        except Exception as e:  # noqa: BLE001 - one bad row must not stop its neighbours
            if len(requests) == 1:
                return [Result(error=generation_failed(e))]
            return [r for req in requests for r in self._generate_or_fail([req])]

    def generate(self, requests: list[Request]) -> list[Result]:
        if not requests:
            return []
        inputs = self.encode(requests)
        lengths = inputs["attention_mask"].sum(1).tolist()
        results: list[Result | None] = [None] * len(requests)
        fit = []
        for i, n in enumerate(lengths):
            if n > self.gen.max_input_length:
                results[i] = prompt_too_long(n, self.gen.max_input_length)
            else:
                fit.append(i)
        # The encoding is reused unless rows were dropped (then the padding changes).
        reuse = inputs if len(fit) == len(requests) else None
        for i, res in zip(fit, self._generate_splitting([requests[i] for i in fit], reuse), strict=True):
            results[i] = res
        return results

    def _generate_splitting(self, requests: list[Request], inputs=None) -> list[Result]:
        if not requests:
            return []
        try:
            return self._generate_batch(requests, inputs)
        except Exception as e:
            if not devices.is_oom(e):
                raise
            devices.empty_cache(self.device)
            if len(requests) == 1:
                return [Result(error=stage_error("generate", e))]
        half = len(requests) // 2
        return self._generate_splitting(requests[:half]) + self._generate_splitting(requests[half:])

    @torch.inference_mode()
    def _generate_batch(self, requests: list[Request], inputs=None) -> list[Result]:
        inputs = (inputs if inputs is not None else self.encode(requests)).to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self.dtype)
        if self.gen.do_sample:
            # Seeded by the batch's first row so a resumed chunk samples what it sampled before.
            torch.manual_seed(self.gen.seed + requests[0].row_index)
        out = self.model.generate(**inputs, generation_config=self.generation_config)
        prompt_lengths = inputs["attention_mask"].sum(1).tolist()
        new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
        # generation.stop_on_repetition: generate runs to the end, the cut is where the fast engine stops
        return [caption_result(tokens, n, self.eos_ids, self.processor.tokenizer, self.gen.stop_on_repetition)
                for tokens, n in zip(new_tokens, prompt_lengths, strict=True)]
