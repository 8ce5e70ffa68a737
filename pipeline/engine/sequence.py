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
    # Another prompt of the same media (Request.shared): the row it shares its first `shared` prompt
    # tokens with; those are prefilled there once and copied into this row's slot.
    source: Sequence | None = None
    shared: int = 0

    @property
    def kind(self) -> str:
        return self.request.kind

    @property
    def position(self) -> int:
        """Cache position the next token is written to (the last one was fed at position - 1)."""
        return self.n_prompt + len(self.tokens) - 1

    def done(self, result: Result) -> Done:
        return self.tag, self.request, result


def link_shared(seqs: list[Sequence]) -> None:
    """Rows of one media (consecutive, the same Request.shared key) take the first of them as their
    source, sharing the tokens their prompts begin with (at least one token of each is left to run:
    its logits give the first caption token)."""
    source = None
    for seq in seqs:
        key = seq.request.shared.key if seq.request.shared else None
        if source is None or key is None or key != source.request.shared.key:
            source = seq if key is not None else None
            continue
        ids, first = seq.encoded.input_ids, source.encoded.input_ids
        n = min(len(first), len(ids) - 1)
        same = (ids[:n] == first[:n]).tolist()
        shared = same.index(False) if False in same else n
        if shared:
            seq.source, seq.shared = source, shared


def shared_prefix(seq: Sequence, call: list[Sequence]) -> int:
    """The prompt tokens `seq` takes from its source's slot in a device call over `call`: its shared
    prefix when the source is prefilled whole in the same call, else 0 (its source failed, or went
    in an earlier call whose slot may since hold another row)."""
    source = seq.source
    return seq.shared if source is not None and any(s is source for s in call) else 0


def by_kind(seqs: list[Sequence]) -> Iterator[list[Sequence]]:
    """The rows of each media kind together: one vision-tower call per kind."""
    for kind in ("image", "video"):
        group = [s for s in seqs if s.kind == kind]
        if group:
            yield group
