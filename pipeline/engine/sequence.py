"""One row through the fast engine, from its encoding to its last token (nano-vllm's `Sequence`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pipeline.engine.base import Request, Result
from pipeline.engine.multimodal import Encoded

# What the fast engine hands back for a row: the caller's tag, its request and its result.
Done = tuple[object, Request, Result]


@dataclass(eq=False)
class Sequence:
    tag: object  # the caller's handle, returned with the result
    request: Request
    encoded: Encoded | None  # the processor's output; dropped once the prompt is in the cache
    n_prompt: int
    slot: int = -1  # the KV-cache slot it is prefilled into and decodes from
    embeds: torch.Tensor | None = None  # prompt embeddings [n_prompt, hidden], while waiting for a slot
    generator: torch.Generator | None = None  # sampling only: per-row, so batching never changes a draw
    tokens: list[int] = field(default_factory=list)
    ngrams: dict[tuple[int, ...], int] = field(default_factory=dict)  # generation.stop_on_repetition

    @property
    def kind(self) -> str:
        return self.request.kind

    @property
    def position(self) -> int:
        """Cache position the next token is written to (the last one was fed at position - 1)."""
        return self.n_prompt + len(self.tokens) - 1

    def done(self, result: Result) -> Done:
        return self.tag, self.request, result


def by_kind(seqs: list[Sequence]) -> Iterator[list[Sequence]]:
    """The rows of each media kind together: one vision-tower call per kind."""
    for kind in ("image", "video"):
        group = [s for s in seqs if s.kind == kind]
        if group:
            yield group
