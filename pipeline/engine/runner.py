"""The fast engine's device side (nano-vllm's ModelRunner): the KV cache, and the tensors of each
prefill and decode step, run through the decoder (pipeline/model/decoder.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from pipeline import devices
from pipeline.config import GenerationConfig
from pipeline.engine import multimodal
from pipeline.engine.sampling import pick
from pipeline.engine.sequence import Sequence
from pipeline.model import decoder
from pipeline.model.kv_cache import GRAPH_WINDOW_BUCKET, WINDOW_BUCKET, KVCache, attention_dims, window_for


def cache_shape(text_config, gen: GenerationConfig) -> tuple[int, int, int, int, int]:
    """(layers, slots, kv_heads, max_len, head_dim) of the fast engine's KV cache."""
    _, kv_heads, head_dim = attention_dims(text_config)
    return (text_config.num_hidden_layers, gen.max_batch_size, kv_heads,
            gen.max_input_length + gen.max_output_length, head_dim)


@dataclass
class StepInputs:
    tokens: torch.Tensor  # [width]: each live slot's last token
    positions: torch.Tensor  # [width]: where each one is written
    window: int  # cache positions attention reads


class Runner:
    def __init__(self, model, gen: GenerationConfig, device: torch.device, *, compile: bool):
        self.model, self.gen, self.device = model, gen, device
        self.dtype = next(model.parameters()).dtype
        self.lm = decoder.language_model(model)
        self.cache = KVCache.allocate(*cache_shape(model.config.text_config, gen),
                                      devices.kv_cache_dtype(device, self.dtype), device)
        self._decode = devices.graph_compile(decoder.decode_step, device) if compile else decoder.decode_step
        self.window_bucket = GRAPH_WINDOW_BUCKET if compile else WINDOW_BUCKET

    def embed(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Prompt embeddings [n_prompt, hidden] of rows of one media kind, one vision-tower call."""
        return multimodal.embed(self.model, seqs[0].kind, [s.encoded for s in seqs], self.dtype, self.device)

    def prefill(self, seqs: list[Sequence]) -> list[int]:
        """Rows of one media kind into their slots, on their own; returns each one's first token."""
        embeds = self.embed(seqs)
        lengths = torch.tensor([len(e) for e in embeds], device=self.device)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        logits = decoder.prefill(self.lm, self.cache, pad_sequence(embeds, batch_first=True), lengths, slots)
        return self._pick(logits, seqs)

    def step_inputs(self, rows: list[Sequence | None]) -> StepInputs:
        last, pos = [0] * len(rows), [0] * len(rows)
        for i, seq in enumerate(rows):
            if seq is not None:
                last[i], pos[i] = seq.tokens[-1], seq.position
        window = window_for(max(pos), self.cache.max_len, self.window_bucket)
        device = self.device
        return StepInputs(torch.tensor(last, device=device), torch.tensor(pos, device=device), window)

    def step(self, inputs: StepInputs, rows: list[Sequence | None],
             new: list[Sequence]) -> tuple[list[int], list[int]]:
        """One token for every row, with the prefill of `new` (embedded) riding along: returns (a
        token per row, the first token of each new row)."""
        args = (self.lm, self.cache, inputs.tokens, inputs.positions, inputs.window)
        if new:
            targets = torch.tensor([s.slot for s in new], device=self.device)
            logits, prompt_logits = decoder.decode_and_prefill(*args, [s.embeds for s in new], targets)
            first = self._pick(prompt_logits, new)
        else:
            logits, first = self._decode(*args), []
        return self._pick(logits, rows), first

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def _pick(self, logits: torch.Tensor, rows: list[Sequence | None]) -> list[int]:
        return pick(logits, rows, self.gen.do_sample, self.gen.temperature, self.gen.top_p)
