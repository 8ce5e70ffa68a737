"""How the fast engine chooses each row's next token from its logits, as transformers would."""

from __future__ import annotations

import torch

from pipeline.engine.sequence import Sequence


def pick(logits: torch.Tensor, rows: list[Sequence | None], do_sample: bool, temperature: float,
         top_p: float) -> list[int]:
    """Next token per row of logits [n, vocab]; greedy is argmax like transformers (in fp32).
    An empty slot (None) gets token 0, which nobody reads."""
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
