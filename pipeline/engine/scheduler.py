"""Which row sits in which cache slot, when a row stops, and how its next token is chosen.

Pure bookkeeping on the host: no model, no cache. The engine asks for free slots, places rows,
feeds every decoded token back and collects the rows that finished. (Part of the fast engine:
pipeline/engine/fast.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.engine.base import Request, Result


@dataclass
class Row:
    tag: object  # the caller's handle, returned with the result
    request: Request
    n_prompt: int
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # sampling only: per-row, so batching never changes a draw


class Slots:
    def __init__(self, count: int, max_new: int, eos_ids: set[int], ignore_eos: bool = False):
        self.rows: list[Row | None] = [None] * count
        self.max_new, self.eos_ids, self.ignore_eos = max_new, eos_ids, ignore_eos

    def free(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def active(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]

    def place(self, slot: int, row: Row) -> None:
        self.rows[slot] = row

    def move(self, src: int, dst: int) -> None:
        """The row in src now lives in the free slot dst (its cache entries were moved with it)."""
        assert self.rows[dst] is None
        self.rows[dst], self.rows[src] = self.rows[src], None

    def position(self, slot: int) -> int:
        """Cache position the slot's next token is written to (its last token was fed at position - 1)."""
        row = self.rows[slot]
        return row.n_prompt + len(row.tokens) - 1

    def push(self, slot: int, token: int) -> Row | None:
        """Record a generated token; returns the row (and frees its slot) when it is finished."""
        row = self.rows[slot]
        row.tokens.append(token)
        stop = not self.ignore_eos and token in self.eos_ids
        if stop or len(row.tokens) >= self.max_new:
            self.rows[slot] = None
            return row
        return None


def finish(row: Row, eos_ids: set[int], decode) -> Result:
    """The Result the HF engine would build from the same tokens."""
    tokens = row.tokens
    stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    kept = tokens if stop is None else tokens[:stop]
    return Result(caption=decode(kept).strip(), n_prompt_tokens=row.n_prompt,
                  n_output_tokens=len(tokens) if stop is None else stop + 1,
                  finish_reason="length" if stop is None else "stop")


def pick(logits: torch.Tensor, rows: list[Row | None], do_sample: bool, temperature: float,
         top_p: float) -> list[int]:
    """Next token per row of logits [n, vocab]; greedy is argmax like transformers (in fp32)."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = _top_p(probs, top_p)
    out = []
    for p, row in zip(probs, rows, strict=True):
        gen = row.generator if row is not None else None
        out.append(int(torch.multinomial(p, 1, generator=gen)) if row is not None else 0)
    return out


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches top_p (at least one), renormalised."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)
