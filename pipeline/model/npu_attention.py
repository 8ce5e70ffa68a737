"""Decode attention on Ascend through torch_npu's fused inference attention op.

Why: masked SDPA (decoder._attend_step) reads every slot's keys and values over the whole window,
the longest row's length rounded up to a bucket, and only then masks out what a slot must not see.
`torch_npu.npu_fused_infer_attention_score` with a one-token query (S = 1) takes its incremental
FlashAttention branch (IncreFlashAttention), which reads each slot only up to its own
`actual_seq_lengths_kv`, straight from the static cache, GQA heads shared in the kernel.

The op's contract, as used here (Ascend/op-plugin op_plugin_functions.yaml and
docs/context/torch_npu-npu_fused_infer_attention_score.md; in op-plugin from 6.0.rc1 for torch 2.1,
from 6.0.rc3 for torch 2.1-2.5, from 7.0.0 for 2.1 to the newest; Atlas A2/A3):

- input_layout "BNSD": query [B, N, 1, D], key and value [B, N_kv, S_kv, D] of one shape; the
  output is query-shaped. query, key, value and atten_mask must be contiguous; the cache slice
  `cache.data[layer, 0, :n]` is, a window `[..., :window, :]` of it is not (so S_kv = max_len).
- num_heads = N and num_key_value_heads = N_kv, N a multiple of N_kv, N / N_kv <= 64 (0 means
  N_kv = N, so GQA must pass it). The softmax scale is the keyword `scale`.
- query fp16 or bf16, key and value of the same dtype (int8 only with antiquant parameters).
- actual_seq_lengths_kv: host ints (the schema's SymInt[]), each slot's valid length: the op reads
  key positions [0, length). torch.compile(dynamic=False) turns SymInt[] arguments into graph
  constants (TorchAir: a changed value recompiles), so a captured step must not pass them.
- atten_mask: bool / int8 / uint8 where True (1) masks a position OUT, the opposite of SDPA's bool
  mask (torch_npu's own SDPA passes `logical_not(attn_mask)`). For S = 1: [B, S_kv], [B, 1, S_kv]
  or [B, 1, 1, S_kv].
- pre_tokens / next_tokens / sparse_mode do nothing when S = 1, so a sliding window cannot be
  passed as pre_tokens: it is folded into the mask (decoder.decode_mask already builds it).
- actual_seq_lengths (the query's) does nothing either when S = 1 and is left out.

Two modes, for graph capture:

- eager: `lengths` (host ints, each slot's position + 1); no mask, except with a sliding window,
  where the window's mask rides along (built once per step; lengths still bound what is read).
- captured (pipeline/engine/decode_graphs.py): `mask` only, so the graph holds no host values (an
  ACL graph would replay the lengths it was captured with); the op then reads all S_kv positions
  of every slot under the mask, like SDPA.

Convert the SDPA mask with `npu_mask` once per step, not once per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline import devices


def npu_mask(sdpa_mask: torch.Tensor) -> torch.Tensor:
    """The op's atten_mask from our SDPA bool mask [n, 1, 1, S] (True = attend): True = masked out."""
    if sdpa_mask.dtype != torch.bool:
        raise ValueError(f"npu_mask takes the SDPA bool mask (True = attend), not {sdpa_mask.dtype}")
    return torch.logical_not(sdpa_mask).contiguous()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, scale: float,
                     lengths: Sequence[int] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of attention for n slots, as SDPA over the cache would give it.

    q [n, heads, 1, head_dim], rope applied; keys, values [n, kv_heads, max_len, head_dim], the first
    n slots of one layer's cache (contiguous: `cache.data[layer, 0, :n]`). lengths: each slot's
    valid length (position + 1) as host ints; mask: `npu_mask(decode_mask(...))` [n, 1, 1, max_len].
    At least one of the two (else stale cache positions would be read). Returns [n, heads, 1,
    head_dim] in q's dtype.

    Host lengths while torch.compile traces are refused: they would become graph constants, guarded,
    so each new list recompiles. (Under fullgraph=True that is an error; otherwise dynamo runs the
    frame eagerly instead of compiling it.)
    """
    _check(q, keys, values, lengths, mask)
    if lengths is not None and torch.compiler.is_compiling():
        raise RuntimeError("decode_attention: host lengths would be baked into the captured graph; pass a mask")
    out, _ = devices.npu_ops().npu_fused_infer_attention_score(
        q.to(keys.dtype).contiguous(), keys, values,
        atten_mask=mask,
        actual_seq_lengths_kv=None if lengths is None else list(lengths),
        num_heads=q.shape[1],
        num_key_value_heads=keys.shape[1],
        input_layout="BNSD",
        scale=float(scale),
    )
    return out.to(q.dtype)


def _check(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: Sequence[int] | None,
           mask: torch.Tensor | None) -> None:
    """ValueError for a call the op would refuse or, worse, answer wrongly."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention: q must be [n, heads, 1, head_dim], got {tuple(q.shape)}")
    n, heads, _, head_dim = q.shape
    if keys.shape != values.shape or keys.dim() != 4 or keys.shape[0] != n or keys.shape[3] != head_dim:
        raise ValueError(f"decode_attention: keys/values must be [{n}, kv_heads, max_len, {head_dim}], "
                         f"got {tuple(keys.shape)} and {tuple(values.shape)}")
    kv_heads, max_len = keys.shape[1], keys.shape[2]
    if heads % kv_heads:
        raise ValueError(f"decode_attention: {heads} query heads do not share {kv_heads} kv heads")
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("decode_attention: keys/values must be contiguous (whole slots of the cache, "
                         "not a window of positions)")
    if lengths is None and mask is None:
        raise ValueError("decode_attention needs lengths (eager) or a mask (captured)")
    if lengths is not None:
        if not isinstance(lengths, (list, tuple)) or len(lengths) != n:
            raise ValueError(f"decode_attention: lengths must be a host list of {n} ints")
        for length in lengths:
            if type(length) is not int or not 1 <= length <= max_len:
                raise ValueError(f"decode_attention: each length must be an int in [1, {max_len}], "
                                 f"got {length!r}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (n, 1, 1, max_len)):
        raise ValueError(f"decode_attention: mask must be npu_mask(...) of shape [{n}, 1, 1, {max_len}], "
                         f"got {mask.dtype} {tuple(mask.shape)}")
