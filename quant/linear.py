"""W8A16Linear: a drop-in nn.Linear whose weight stays int8 on the device.

Stored like the ascendV1 files: weight int8 [n, k], weight_scale / weight_offset [n, G] (G = 1
per-channel, k/group_size per-group), dequant = (q - offset) * scale. The weight is never
dequantised at load; each device gets the best kernel it has:
- npu: torch_npu.npu_weight_quant_batchmatmul, whose formula is (w + antiquant_offset) * scale,
  hence the negated offset; weight passed as [k, n] (a transposed view, which the API documents
  as the fast per-channel layout), scale [n] or [k/G, n] per-group, in the activation dtype.
- cpu / cuda: torch._weight_int8pack_mm(x [m, k], w [n, k], scales [n]), per-channel symmetric
  only. On CPU in torch 2.14 it takes fp32 / fp16 / bf16 activations with scales of the same
  dtype, but bf16 needs k % 16 == 0: other k crash the process (segfault), so that is checked.
- anything else (per-group or asymmetric on cpu/cuda, other dtypes): dequantise one layer's
  weight on the fly and matmul, under torch.compile on CUDA so the dequant fuses into one kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import devices
from quant.qmath import quantize_rows

_compiled_dequant_linear = None


def _dequant_linear(x, weight, scale, offset, bias, group_size: int):
    k = weight.shape[1]
    if group_size:  # [n, k/G] -> [n, k]; the last group may be short
        scale = scale.repeat_interleave(group_size, dim=1)[:, :k]
        offset = None if offset is None else offset.repeat_interleave(group_size, dim=1)[:, :k]
    w = weight.to(x.dtype)
    if offset is not None:
        w = w - offset.to(x.dtype)
    return F.linear(x, w * scale.to(x.dtype), bias)


class W8A16Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 0,
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = math.ceil(in_features / group_size) if group_size else 1
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("weight_offset", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.kernel = "dequant"
        self._offset_used = None  # None when symmetric, so kernels skip the subtraction

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> W8A16Linear:
        """Quantize a float nn.Linear in memory (tests, benchmarks); the converter streams instead."""
        dtype = dtype or linear.weight.dtype
        q, scale = quantize_rows(linear.weight, dtype)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=linear.weight.device, dtype=dtype)
        new.weight.copy_(q)
        new.weight_scale.copy_(scale)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
        new.finalize()
        return new

    def extra_repr(self) -> str:
        gran = f"group_size={self.group_size}" if self.group_size else "per-channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {gran}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")

    @torch.no_grad()
    def finalize(self, device_type: str | None = None) -> None:
        """Pick the kernel and precompute its operand layouts; call once the buffers are loaded.

        `device_type` overrides the buffers' device type (tests drive the NPU path with a stub)."""
        device_type = device_type or self.weight.device.type
        symmetric = not bool(self.weight_offset.any())
        self._offset_used = None if symmetric else self.weight_offset
        if device_type == "npu":
            self.kernel = "npu"
            grouped = self.group_size > 0
            self._npu_scale = self.weight_scale.t().contiguous() if grouped else self.weight_scale.reshape(-1)
            neg = None if symmetric else -self.weight_offset
            self._npu_offset = None if neg is None else (neg.t().contiguous() if grouped else neg.reshape(-1))
        elif device_type in ("cpu", "cuda") and symmetric and not self.group_size:
            self.kernel = "int8pack"
            self._scale_1d = self.weight_scale.reshape(-1).contiguous()
        else:
            self.kernel = "dequant"

    def _int8pack_ok(self, x: torch.Tensor) -> bool:
        if x.dtype != self._scale_1d.dtype:
            return False
        if x.device.type == "cpu":
            return x.dtype in (torch.float32, torch.float16) or (
                x.dtype == torch.bfloat16 and self.in_features % 16 == 0)
        return x.dtype in (torch.float32, torch.float16, torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "npu":
            y = devices.npu_ops().npu_weight_quant_batchmatmul(
                x2, self.weight.t(), self._npu_scale, self._npu_offset,
                antiquant_group_size=self.group_size)
            if self.bias is not None:  # added outside: the kernel's bias dtype rules differ per chip
                y = y + self.bias
        elif self.kernel == "int8pack" and self._int8pack_ok(x2):
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self._scale_1d)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = self._dequant(x2)
        return y.reshape(*lead, self.out_features)

    def _dequant(self, x2: torch.Tensor) -> torch.Tensor:
        global _compiled_dequant_linear
        fn = _dequant_linear
        if x2.device.type == "cuda":
            if _compiled_dequant_linear is None:
                _compiled_dequant_linear = torch.compile(_dequant_linear, dynamic=True)
            fn = _compiled_dequant_linear
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        return fn(x2, self.weight, self.weight_scale, self._offset_used, bias, self.group_size)
