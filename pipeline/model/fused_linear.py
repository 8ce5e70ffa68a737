"""Several projections of one input read as a single matmul (q/k/v, gate/up).

At the fast engine's decode shape ([slots, hidden], 16 rows) a matmul is bound by its fixed costs
and weight reads, so one [hidden, q+k+v] product beats three (and one gate/up product two).

The fused weight is not a second copy: the modules' own weights become views of it, so the
transformers path (engine "hf") keeps working on the same tensors and memory does not grow. On the
CPU, where oneDNN packs the dtype (bf16, fp32), the fused weight is packed for it instead
(pipeline/model/packed_linear.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import packed_linear

Projections = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def fuse(owner: nn.Module, names: Sequence[str]) -> Projections:
    """x -> (owner.<names[0]>(x), ...), one matmul when every module is a plain nn.Linear.

    Anything else (W8A16Linear, a hooked or offloaded module) keeps its own forward, called in turn.
    """
    packed = packed_linear.packed_group(owner, names)  # a second engine on a packed model
    if packed is not None:
        return packed.split
    linears = [getattr(owner, name) for name in names]
    if not _fusable(linears):
        return lambda x: tuple(linear(x) for linear in linears)
    if packed_linear.packable(linears):
        return packed_linear.pack(owner, names).split
    sizes = [linear.out_features for linear in linears]
    weight = _adjacent([linear.weight for linear in linears])
    if weight is None:  # first fusion of these modules: concatenate, then re-point them at slices
        weight = torch.cat([linear.weight.detach() for linear in linears])
        for linear, part in zip(linears, weight.split(sizes), strict=True):
            linear.weight = nn.Parameter(part, requires_grad=False)
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([linear.bias.detach() for linear in linears])  # a few KB: copying is fine

    def project(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, weight, bias).split(sizes, dim=-1)

    return project


def pack_single(owner: nn.Module, name: str) -> None:
    """Pack owner.<name> for oneDNN when it can be (bf16/fp32 nn.Linear on the CPU); it stays a module."""
    if packed_linear.packed_group(owner, [name]) is None and packed_linear.packable([getattr(owner, name)]):
        packed_linear.pack(owner, [name])


def _fusable(linears: Sequence[nn.Module]) -> bool:
    first = linears[0]
    return all(
        type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
        and m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device and m.weight.device.type != "meta"
        and (m.bias is None) == (first.bias is None)
        for m in linears)


def _adjacent(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The fused tensor when the weights already are consecutive rows of one (a second engine on the
    same model); None otherwise."""
    first = weights[0]
    pointer = first.data_ptr()
    for w in weights:
        if not w.is_contiguous() or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or w.data_ptr() != pointer:
            return None
        pointer += w.numel() * w.element_size()
    rows = sum(w.shape[0] for w in weights)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))
