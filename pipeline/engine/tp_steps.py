"""Tensor parallel steps: rank 0 runs the engine (scheduler, feeder, vision tower, sampling) and
announces each device call to the other ranks, which run the same decoder call on their shards
(pipeline/model/tensor_parallel.py) and drop its logits. Every rank thus runs the same step with
the same shapes, and refills, compaction and EOS behave as at world size 1.

An announcement is two broadcasts from rank 0, [op, n] then the op's n integers, followed by the
op's tensors, whose shapes the integers give. Prompt embeddings travel whole: the vision tower and
projector run on rank 0 only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from pipeline.engine.decode_graphs import DecodeGraphs
from pipeline.model import decoder
from pipeline.model.kv_cache import KVCache

PLAN, PREFILL, DECODE, MIXED, MOVE, STOP, CAPTURE, GRAPH_STEP = range(8)


class RankLost(BaseException):
    """A step of a tensor parallel group failed: the ranks cannot be brought back in step, so the
    worker ends (and is replaced) instead of failing rows. A BaseException so that the engine's
    per-row error handling does not take it for a bad row."""


class Leader:
    """Rank 0's side: each call is announced, then run here by the caller."""

    def __init__(self, device: torch.device, dtype: torch.dtype, hidden: int):
        self.device, self.dtype, self.hidden = device, dtype, hidden

    def plan(self, slots: int, slot_length: int) -> None:
        self._send(PLAN, [slots, slot_length])

    def prefill(self, embeds: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> None:
        self._send(PREFILL, [*embeds.shape[:2]], [embeds, lengths, slots])

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, window: int, host: bool) -> None:
        self._send(DECODE, [tokens.shape[0], window, int(host)], [tokens, positions])

    def mixed(self, tokens: torch.Tensor, positions: torch.Tensor, window: int, host: bool,
              prompts: list[torch.Tensor], slots: torch.Tensor, prefixes: list[tuple[int, int]]) -> None:
        sizes = [p.shape[0] for p in prompts]
        shared = [x for prefix in prefixes for x in prefix]
        self._send(MIXED, [tokens.shape[0], window, int(host), len(sizes), *sizes, *shared],
                   [tokens, positions, torch.cat(prompts), slots])

    def move(self, src: int, dst: int, length: int) -> None:
        self._send(MOVE, [src, dst, length])

    def capture(self) -> None:
        """Every rank captures its decode graphs now: the all-reduces inside them need all ranks."""
        self._send(CAPTURE, [])

    def graph_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self._send(GRAPH_STEP, [tokens.shape[0]], [tokens, positions])

    def stop(self) -> None:
        self._send(STOP, [])

    def _send(self, op: int, ints: list[int], tensors: list[torch.Tensor] = ()) -> None:
        try:
            dist.broadcast(torch.tensor([op, len(ints)], device=self.device), src=0)
            if ints:
                dist.broadcast(torch.tensor(ints, device=self.device), src=0)
            for tensor in tensors:
                dist.broadcast(tensor.contiguous(), src=0)
        except Exception as e:  # noqa: BLE001 - a lost rank shows up as whatever the backend raises
            raise RankLost(f"tensor parallel group lost a rank: {type(e).__name__}: {e}") from e


def receive_plan(device: torch.device) -> tuple[int, int]:
    op, ints = _header(device)
    if op != PLAN:
        raise RuntimeError(f"tensor parallel: expected the cache plan first, got op {op}")
    return ints[0], ints[1]


def follow(lm: decoder.LanguageModel, cache: KVCache, device: torch.device, dtype: torch.dtype,
           hidden: int, on_step: Callable[[], None] | None = None) -> None:
    """A follower rank's loop: run every announced call until rank 0 says stop."""
    graphs = None
    while True:
        if on_step is not None:
            on_step()
        op, ints = _header(device)
        if op == STOP:
            return
        if op == MOVE:
            cache.move(*ints)
        elif op == CAPTURE:
            graphs = DecodeGraphs(lm, cache, device)
        elif op == GRAPH_STEP:
            tokens, positions = _recv((ints[0],), torch.long, device), _recv((ints[0],), torch.long, device)
            graphs.run(tokens, positions)
        elif op == PREFILL:
            n, seq = ints
            embeds = _recv((n, seq, hidden), dtype, device)
            lengths, slots = _recv((n,), torch.long, device), _recv((n,), torch.long, device)
            decoder.prefill(lm, cache, embeds, lengths, slots)
        elif op == DECODE:
            n, window, host = ints
            tokens, positions = _recv((n,), torch.long, device), _recv((n,), torch.long, device)
            decoder.decode_step(lm, cache, tokens, positions, window, _host(positions, host))
        elif op == MIXED:
            n, window, host, count = ints[:4]
            sizes, shared = ints[4:4 + count], ints[4 + count:]
            tokens, positions = _recv((n,), torch.long, device), _recv((n,), torch.long, device)
            packed = _recv((sum(sizes), hidden), dtype, device)
            slots = _recv((count,), torch.long, device)
            decoder.decode_and_prefill(lm, cache, tokens, positions, window, list(packed.split(sizes)), slots,
                                       _host(positions, host), list(zip(shared[::2], shared[1::2], strict=True)))
        else:
            raise RuntimeError(f"tensor parallel: unknown op {op}")


def _host(positions: torch.Tensor, host: int) -> list[int] | None:
    return [p + 1 for p in positions.tolist()] if host else None


def _header(device: torch.device) -> tuple[int, list[int]]:
    head = torch.zeros(2, dtype=torch.long, device=device)
    dist.broadcast(head, src=0)
    op, n = head.tolist()
    if not n:
        return op, []
    ints = torch.zeros(n, dtype=torch.long, device=device)
    dist.broadcast(ints, src=0)
    return op, ints.tolist()


def _recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(tensor, src=0)
    return tensor
