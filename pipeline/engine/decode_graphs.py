"""The decode step captured once per batch bucket (nano-vllm's capture_cudagraph), then replayed.

A step with k live rows (always slots [0, k): the scheduler compacts) replays the smallest bucket
>= k. The rows past k are free slots: they write garbage at their own position 0, which nobody
reads and the next prefill into the slot overwrites. A graph replays fixed addresses, so each step's
inputs are copied into static buffers, the cache is the one allocated at start, and attention reads
every slot's whole length under a mask, with no window chosen on the host. The whole step is in
the graph: embeddings, cache writes, attention, lm_head; prefill and refill steps stay eager.

Where the device has no graphs (the CPU) the same bucket-padded step runs eagerly, which is what the
tests hold to the unpadded one.
"""

from __future__ import annotations

import torch

from pipeline import devices
from pipeline.logs import log
from pipeline.model import decoder
from pipeline.model.kv_cache import KVCache


def buckets(slots: int) -> list[int]:
    """1, 2, 4, ... below `slots`, then `slots` itself."""
    sizes = [1]
    while sizes[-1] * 2 < slots:
        sizes.append(sizes[-1] * 2)
    return sizes + [slots] if sizes[-1] != slots else sizes


def bucket_for(rows: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= rows)


class DecodeGraphs:
    def __init__(self, lm: decoder.LanguageModel, cache: KVCache, device: torch.device):
        self.lm, self.cache, self.device = lm, cache, device
        self.sizes = buckets(cache.slots)
        self.tokens = torch.zeros(cache.slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(cache.slots, dtype=torch.long, device=device)
        self.api = devices.graph_api(device)
        self.graphs: dict[int, object] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if self.api is None:
            log.info(f"generation.compile: {device} has no graphs; decode steps are padded to the "
                     f"batch buckets {self.sizes} and run eagerly")
        else:
            self._capture()

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] of one decode step of slots [0, n), n = len(tokens)."""
        n = tokens.shape[0]
        size = bucket_for(n, self.sizes)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.tokens[n:size].zero_()
        self.positions[n:size].zero_()
        if not self.graphs:
            return self._step(size)[:n]
        self.graphs[size].replay()
        return self.logits[size][:n]

    def _step(self, size: int) -> torch.Tensor:
        return decoder.decode_step(self.lm, self.cache, self.tokens[:size], self.positions[:size],
                                   self.cache.max_len)

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest bucket first, all in one memory pool: the smaller graphs reuse its blocks. The
        steps run here write only at position 0 of every slot, before any row has one."""
        pool = self.api.pool()
        for size in reversed(self.sizes):
            self._step(size)  # warm-up: lazy initialisation (library handles, workspaces) must not be captured
            graph = self.api.graph()
            with self.api.capture(graph, pool=pool):
                self.logits[size] = self._step(size)
            self.graphs[size] = graph
        devices.synchronize(self.device)
