"""The W8A16 quantization math, shared by the builtin converter and W8A16Linear.from_linear."""

from __future__ import annotations

import torch

QMAX = 127  # symmetric range [-127, 127], as msModelSlim writes


def quantize_rows(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a [rows, k] block -> (int8 [rows, k], scale [rows, 1]).

    The scale is rounded to its storage dtype first and the weight divided by that stored value,
    so q * scale as read back is the nearest grid point. The division runs in fp32: msModelSlim
    divides in the model dtype (bf16 keeps one fractional bit near 127), which moves some of
    the values by one step; both agree to <= 1 step and share identical scales.
    """
    wf = w.float()
    if wf.data_ptr() == w.data_ptr():
        wf = wf.clone()  # fp32 input: never scale the caller's tensor in place
    absmax = torch.linalg.vector_norm(wf, ord=float("inf"), dim=1, keepdim=True)  # no |w| temp
    scale = (absmax / QMAX).to(scale_dtype)
    s = scale.float()
    # in place: peak memory is the block, its fp32 copy and the int8 result, nothing more
    q = wf.div_(torch.where(s > 0, s, torch.ones_like(s))).round_().clamp_(-QMAX, QMAX)
    return q.to(torch.int8), scale
