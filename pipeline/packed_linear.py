"""bf16 linears on the CPU with their weights packed once for oneDNN.

`F.linear` in bf16 on the CPU hands oneDNN a plain [out, in] weight, which it re-lays out into its
blocked format on every call. At decode shapes that re-layout is most of the call, and it reads the
weight from memory cold: in a decode step of the bench model (16 rows) gate/up + down took ~700 us
with F.linear and ~300 us packed. Packing once at load is what inductor's CPU freezing pass does
(`mkldnn._reorder_linear_weight` + `mkldnn._linear_pointwise`); the results are bit-identical to
F.linear's.

The packed tensor replaces the module's weight, it is not a second copy: the nn.Linear is swapped
for a PackedLinear in its parent, so the model's own forward (the hf engine) runs on it too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks its blocking for this many input rows; results do not depend on it, and a 16-row
# hint ran 1..1000 rows as fast as an exact one on the dev CPU.
ROWS_HINT = 16


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
    """Plain bf16 nn.Linear modules on the CPU, with oneDNN present and packing it as expected."""
    return all(type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.bfloat16 for m in linears) \
        and onednn_packs_bf16()


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
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w, x = torch.randn(48, 32).bfloat16(), torch.randn(5, 32).bfloat16()
        m = nn.Linear(32, 48, bias=False).bfloat16()
        m.weight.data.copy_(w)
        return torch.equal(PackedLinear([m])(x), F.linear(x, w))
    except (RuntimeError, AttributeError):  # a torch without these oneDNN ops
        return False
