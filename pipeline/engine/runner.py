"""The fast engine's device side (nano-vllm's ModelRunner): the KV cache, and the tensors of each
prefill and decode step, run through the decoder (pipeline/model/decoder.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence

from pipeline import devices
from pipeline.config import GenerationConfig
from pipeline.engine import multimodal
from pipeline.engine.cache_plan import CachePlan
from pipeline.engine.decode_graphs import DecodeGraphs
from pipeline.engine.sampling import pick
from pipeline.engine.sequence import Sequence, shared_prefix
from pipeline.engine.tp_steps import Leader, RankLost
from pipeline.logs import log
from pipeline.model import decoder
from pipeline.model.kv_cache import KVCache, window_for

T = TypeVar("T")


@dataclass
class StepInputs:
    tokens: torch.Tensor  # [width]: each live slot's last token
    positions: torch.Tensor  # [width]: where each one is written
    window: int  # cache positions attention reads
    lengths: list[int]  # each one's position + 1, on the host (the npu attention op takes them so)


def allocate_cache(lm: decoder.LanguageModel, plan: CachePlan, device: torch.device, dtype: torch.dtype) -> KVCache:
    """The KV cache of this rank: its own KV heads only under tensor parallel."""
    return KVCache.allocate(len(lm.layers), plan.slots, lm.kv_heads, plan.slot_length, lm.head_dim,
                            devices.kv_cache_dtype(device, dtype), device)


class Runner:
    def __init__(self, model, plan: CachePlan, gen: GenerationConfig, device: torch.device, *, compile: bool,
                 tp: Leader | None = None):
        self.model, self.gen, self.device, self.tp = model, gen, device, tp
        self.dtype = next(model.parameters()).dtype
        self.lm = decoder.language_model(model)
        self.cache = allocate_cache(self.lm, plan, device, self.dtype)
        if tp is not None:
            tp.plan(plan.slots, plan.slot_length)
        # After the cache: the graphs hold its addresses.
        self.graphs = self._graphs(device) if compile else None

    def _graphs(self, device: torch.device) -> DecodeGraphs | None:
        """The captured decode graphs; a capture the device refuses costs the job its speed-up, not its
        rows (under tensor parallel every rank captures at once, and a refusal ends the group)."""
        if self.tp is not None:
            return self._on_ranks(self.tp.capture, lambda: DecodeGraphs(self.lm, self.cache, device))
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
        if any(shared_prefix(s, seqs) for s in seqs):  # only packed prompts can share a prefix
            for seq, e in zip(seqs, embeds, strict=True):
                seq.embeds = e
            return self.step(self.step_inputs([]), [], seqs)[1]
        lengths = torch.tensor([len(e) for e in embeds], device=self.device)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        padded = pad_sequence(embeds, batch_first=True)
        logits = self._on_ranks(lambda: self.tp.prefill(padded, lengths, slots),
                                lambda: decoder.prefill(self.lm, self.cache, padded, lengths, slots))
        return self._pick(logits, seqs)

    def step_inputs(self, rows: list[Sequence | None]) -> StepInputs:
        last, pos = [0] * len(rows), [0] * len(rows)
        for i, seq in enumerate(rows):
            if seq is not None:
                last[i], pos[i] = seq.tokens[-1], seq.position
        window = window_for(max(pos, default=0), self.cache.max_len)
        device = self.device
        return StepInputs(torch.tensor(last, dtype=torch.long, device=device),
                          torch.tensor(pos, dtype=torch.long, device=device), window,
                          [p + 1 for p in pos])

    def step(self, inputs: StepInputs, rows: list[Sequence | None],
             new: list[Sequence]) -> tuple[list[int], list[int]]:
        """One token for every row, with the prefill of `new` (embedded) riding along: returns (a
        token per row, the first token of each new row)."""
        args = (self.lm, self.cache, inputs.tokens, inputs.positions, inputs.window)
        host = self.cache.attention == "npu"
        if new:
            targets = torch.tensor([s.slot for s in new], device=self.device)
            shared = [shared_prefix(s, new) for s in new]
            prompts = [s.embeds[k:] for s, k in zip(new, shared, strict=True)]
            prefixes = [(s.source.slot, k) if k else (-1, 0) for s, k in zip(new, shared, strict=True)]
            logits, prompt_logits = self._on_ranks(
                lambda: self.tp.mixed(inputs.tokens, inputs.positions, inputs.window, host, prompts, targets, prefixes),
                lambda: decoder.decode_and_prefill(*args, prompts, targets, inputs.lengths if host else None,
                                                   prefixes))
            for seq, (source, k) in zip(new, prefixes, strict=True):
                if k:  # the rest is in the row's slot; its first tokens come from the source's
                    self.move(source, seq.slot, k)
            first = self._pick(prompt_logits, new)
        elif self.graphs is not None:
            logits = self._on_ranks(lambda: self.tp.graph_step(inputs.tokens, inputs.positions),
                                    lambda: self.graphs.run(inputs.tokens, inputs.positions))
            first = []
        else:
            logits = self._on_ranks(lambda: self.tp.decode(inputs.tokens, inputs.positions, inputs.window, host),
                                    lambda: decoder.decode_step(*args, inputs.lengths if host else None))
            first = []
        return self._pick(logits, rows), first

    def move(self, src: int, dst: int, length: int) -> None:
        self._on_ranks(lambda: self.tp.move(src, dst, length), lambda: self.cache.move(src, dst, length))

    def _on_ranks(self, announce: Callable[[], None], call: Callable[[], T]) -> T:
        """`call` here, announced first to the other ranks under tensor parallel. There a failure
        cannot be confined to rows: the ranks would leave step, so it ends the group (RankLost)."""
        if self.tp is None:
            return call()
        try:
            announce()
            return call()
        except RankLost:
            raise
        except Exception as e:  # noqa: BLE001 - any failure mid-collective
            raise RankLost(f"a tensor parallel step failed on rank 0: {type(e).__name__}: {e}") from e

    def _pick(self, logits: torch.Tensor, rows: list[Sequence | None]) -> list[int]:
        return pick(logits, rows, self.gen.do_sample, self.gen.temperature, self.gen.top_p)
