"""The fast engine's device side (nano-vllm's ModelRunner): the KV cache, and the tensors of each
prefill and decode step, run through the decoder (pipeline/model/decoder.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from pipeline import devices
from pipeline.config import GenerationConfig
from pipeline.engine import multimodal
from pipeline.engine.cache_plan import CachePlan
from pipeline.engine.decode_graphs import DecodeGraphs
from pipeline.engine.sampling import pick
from pipeline.engine.sequence import Sequence
from pipeline.logs import log
from pipeline.model import decoder
from pipeline.model.kv_cache import KVCache, attention_dims, window_for


@dataclass
class StepInputs:
    tokens: torch.Tensor  # [width]: each live slot's last token
    positions: torch.Tensor  # [width]: where each one is written
    window: int  # cache positions attention reads
    lengths: list[int]  # each one's position + 1, on the host (the npu attention op takes them so)


class Runner:
    def __init__(self, model, plan: CachePlan, gen: GenerationConfig, device: torch.device, *, compile: bool):
        self.model, self.gen, self.device = model, gen, device
        self.dtype = next(model.parameters()).dtype
        self.lm = decoder.language_model(model)
        text = model.config.text_config
        _, kv_heads, head_dim = attention_dims(text)
        self.cache = KVCache.allocate(text.num_hidden_layers, plan.slots, kv_heads, plan.slot_length, head_dim,
                                      devices.kv_cache_dtype(device, self.dtype), device)
        # After the cache: the graphs hold its addresses.
        self.graphs = self._graphs(device) if compile else None

    def _graphs(self, device: torch.device) -> DecodeGraphs | None:
        """The captured decode graphs; a capture the device refuses costs the job its speed-up, not its rows."""
        try:
            return DecodeGraphs(self.lm, self.cache, device)
        except Exception as e:  # noqa: BLE001 - whatever the graph runtime raises, eager still works
            log.warning(f"generation.compile: graph capture failed on {device} ({type(e).__name__}: {e}); "
                        "decode steps run eagerly")
            devices.empty_cache(device)
            return None

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
        window = window_for(max(pos), self.cache.max_len)
        device = self.device
        return StepInputs(torch.tensor(last, device=device), torch.tensor(pos, device=device), window,
                          [p + 1 for p in pos])

    def step(self, inputs: StepInputs, rows: list[Sequence | None],
             new: list[Sequence]) -> tuple[list[int], list[int]]:
        """One token for every row, with the prefill of `new` (embedded) riding along: returns (a
        token per row, the first token of each new row)."""
        args = (self.lm, self.cache, inputs.tokens, inputs.positions, inputs.window)
        if new:
            targets = torch.tensor([s.slot for s in new], device=self.device)
            logits, prompt_logits = decoder.decode_and_prefill(*args, [s.embeds for s in new], targets,
                                                               inputs.lengths)
            first = self._pick(prompt_logits, new)
        elif self.graphs is not None:
            logits, first = self.graphs.run(inputs.tokens, inputs.positions), []
        else:
            logits, first = decoder.decode_step(*args, inputs.lengths), []
        return self._pick(logits, rows), first

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def _pick(self, logits: torch.Tensor, rows: list[Sequence | None]) -> list[int]:
        return pick(logits, rows, self.gen.do_sample, self.gen.temperature, self.gen.top_p)
