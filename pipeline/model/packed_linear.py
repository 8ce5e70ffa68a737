"""Linears on the CPU with their weights packed once for oneDNN (bf16 and fp32).

`F.linear` in bf16 on the CPU hands oneDNN a plain [out, in] weight, which it re-lays out into its
blocked format on every call. At decode shapes that re-layout is most of the call, and it reads the
weight from memory cold. Packing once at load is what inductor's CPU freezing pass does
(`mkldnn._reorder_linear_weight` + `mkldnn._linear_pointwise`); in bf16 the results are
bit-identical to F.linear's.

fp32 `F.linear` goes to MKL's sgemm, which packs its operand on every call too (and on AMD CPUs
takes a slow generic path). A oneDNN-packed fp32 weight computes the same products in oneDNN's
summation order: the outputs differ from F.linear's only by fp32 rounding, as any other blocking
would, and greedy captions still equal transformers' (tests/test_parity.py).

The packed tensor replaces the module's weight, it is not a second copy: the nn.Linear is swapped
for a PackedLinear in its parent, so the model's own forward (the hf engine) runs on it too.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks its blocking for this many input rows; results do not depend on it, and a 16-row
# hint ran 1..1000 rows as fast as an exact one on the dev CPU.
ROWS_HINT = 16
PACK_ENV = "LLAVA_BATCH_PACK_LINEARS"  # 0: keep every linear plain (to compare, or to rule packing out)


class PackedLinear(nn.Module):
    """One nn.Linear, or several sharing an input (q/k/v), as one packed matmul."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [m.out_features for m in linears]
        self.in_features, self.out_features = linears[0].in_features, sum(self.sizes)
        weight = torch.cat([m.weight.detach() for m in linears])
        # Plain attributes, not parameters: an opaque oneDNN tensor cannot be saved or moved.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        self.bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.sizes, dim=-1)


class PackedPart(nn.Module):
    """Stands in for one of the linears a PackedLinear took over, so the model's own forward still
    runs: it computes the whole fused product and keeps its part. The fast engine calls the
    PackedLinear once instead; only the hf engine on a model the fast engine packed pays this."""

    def __init__(self, whole: PackedLinear, index: int):
        super().__init__()
        self.whole, self.index = whole, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.whole.split(x)[self.index]


def packable(linears: list[nn.Module]) -> bool:
    """Plain bf16 or fp32 nn.Linear modules on the CPU, with oneDNN present and packing that dtype."""
    dtype = linears[0].weight.dtype
    return all(type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
               and m.weight.device.type == "cpu" and m.weight.dtype == dtype for m in linears) \
        and onednn_packs(dtype)


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether linears of `dtype` are packed on this machine ($LLAVA_BATCH_PACK_LINEARS=0: never)."""
    if os.environ.get(PACK_ENV, "1") == "0":
        return False
    if dtype == torch.bfloat16:
        return onednn_packs_bf16()
    return dtype == torch.float32 and onednn_packs_fp32()


def pack(owner: nn.Module, names: list[str]) -> PackedLinear:
    """Replace owner.<names> (packable, one input) by one PackedLinear; several names get PackedParts."""
    linears = [getattr(owner, name) for name in names]
    packed = PackedLinear(linears)
    if len(names) == 1:
        setattr(owner, names[0], packed)
    else:
        for i, name in enumerate(names):
            setattr(owner, name, PackedPart(packed, i))
    return packed


def packed_group(owner: nn.Module, names: list[str]) -> PackedLinear | None:
    """The PackedLinear behind owner.<names> when an earlier pack() made them (a second engine on
    the same model), else None."""
    modules = [getattr(owner, name) for name in names]
    if len(modules) == 1:
        return modules[0] if isinstance(modules[0], PackedLinear) else None
    if not all(isinstance(m, PackedPart) and m.whole is modules[0].whole and m.index == i
               for i, m in enumerate(modules)):
        return None
    return modules[0].whole


@functools.cache
def onednn_packs_bf16() -> bool:
    """Whether this torch and CPU pack bf16 weights for oneDNN, bit-identical to F.linear. oneDNN's
    bf16 kernels need AVX-512 (BF16 or AMX to be fast); where it has none, torch runs bf16 linears
    its own way and packing would buy nothing, so the linears stay plain."""
    got, expected = _try_packed(torch.bfloat16)
    return got is not None and torch.equal(got, expected)


@functools.cache
def onednn_packs_fp32() -> bool:
    """Whether this torch packs fp32 weights for oneDNN, agreeing with F.linear to fp32 rounding."""
    got, expected = _try_packed(torch.float32)
    return got is not None and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def _try_packed(dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(a small packed product, F.linear's); None first where this torch or CPU cannot pack."""
    generator = torch.Generator().manual_seed(0)
    w, x = (torch.randn(shape, generator=generator).to(dtype) for shape in ((48, 32), (5, 32)))
    expected = F.linear(x, w)
    try:
        if not torch.backends.mkldnn.is_available():
            return None, expected
        m = nn.Linear(32, 48, bias=False).to(dtype)
        m.weight.data.copy_(w)
        return PackedLinear([m])(x), expected
    except (RuntimeError, AttributeError):  # a torch without these oneDNN ops, or not for this dtype
        return None, expected
