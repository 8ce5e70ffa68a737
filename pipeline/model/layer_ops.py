"""Two small ops of a decoder layer: RMSNorm and the rotary embedding through our fused CPU kernels
where they apply (pipeline/kernels/cpu.py), else transformers' own modules and functions.

At decode shapes each of these is 6-12 eager torch ops of a few microseconds; ours are one call
and round where transformers rounds (bf16: bit-identical; fp32: within an ulp, the RMS sum's order).
SiLU gating stays `act_fn(gate) * up`: a fused kernel measured no faster than torch's two ops.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.kernels import cpu as cpu_kernels

Norm = Callable[[torch.Tensor], torch.Tensor]


def ours(model: nn.Module) -> bool:
    """Whether this model's decoder runs our fused CPU ops."""
    # the embeddings, not the first parameter: a tensor parallel rank > 0 keeps the vision tower on meta
    return model.get_input_embeddings().weight.device.type == "cpu" and cpu_kernels.available()


def norm(module: nn.Module, fused: bool) -> Norm:
    if fused and type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
        return partial(cpu_kernels.rms_norm, weight=module.weight, eps=module.variance_epsilon)
    return module


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [batch, seq, heads, head_dim] -> rotated [batch, heads, seq, head_dim]."""
    if fused:
        return cpu_kernels.rope(q, cos, sin).transpose(1, 2), cpu_kernels.rope(k, cos, sin).transpose(1, 2)
    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
