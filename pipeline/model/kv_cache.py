"""A KV cache allocated once: [layers, 2, slots, kv_heads, max_len, head_dim].

Every slot holds one row's keys and values from position 0; nothing is ever reallocated, so the
decode step keeps one shape for the whole run (what CUDA graphs and NPU graph mode need). Positions
past a slot's current length hold stale values from earlier rows; the attention mask hides them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.kernels import cpu as cpu_kernels

# Eager decode attends over the first `window` cache positions only, rounded up to a multiple of
# this: every position read past the longest row is attention time wasted. (Captured steps read
# every slot's whole length: engine/decode_graphs.py.)
WINDOW_BUCKET = 32


@dataclass
class KVCache:
    data: torch.Tensor  # [layers, 2, slots, kv_heads, max_len, head_dim]
    # How decode steps read it: "kernel" (our CPU kernel, pipeline/kernels/cpu.py), "npu" (torch_npu's
    # fused attention, pipeline/model/npu_attention.py) or "sdpa". Decided once, not per step.
    attention: str = field(init=False)

    def __post_init__(self):
        if cpu_kernels.usable(self.data):
            self.attention = "kernel"
        else:
            # the npu op takes fp16 / bf16 only
            npu = self.data.device.type == "npu" and self.data.dtype in (torch.float16, torch.bfloat16)
            self.attention = "npu" if npu else "sdpa"
        self._layers = [(layer[0], layer[1]) for layer in self.data]  # views, made once

    @classmethod
    def allocate(cls, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> KVCache:
        return cls(torch.zeros(layers, 2, slots, kv_heads, max_len, head_dim, dtype=dtype, device=device))

    @property
    def slots(self) -> int:
        return self.data.shape[2]

    @property
    def max_len(self) -> int:
        return self.data.shape[4]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, every slot and position: [slots, kv_heads, max_len, head_dim] each."""
        return self._layers[layer]

    def write_prefill(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, kv_heads, length, head_dim] go to positions 0..length-1 of `slots` [n]."""
        length = k.shape[2]
        self.data[layer, 0, slots, :, :length] = k.to(self.data.dtype)
        self.data[layer, 1, slots, :, :length] = v.to(self.data.dtype)

    def write_at(self, layer: int, slots: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, kv_heads, length, head_dim] go to positions start..start+length-1 of `slots` [n]."""
        stop = start + k.shape[2]
        self.data[layer, 0, slots, :, start:stop] = k.to(self.data.dtype)
        self.data[layer, 1, slots, :, start:stop] = v.to(self.data.dtype)

    def write_step(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, kv_heads, 1, head_dim] of the first n slots go to each one's position [n]."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        self.data[layer, 0, rows, :, positions] = k[:, :, 0].to(self.data.dtype)
        self.data[layer, 1, rows, :, positions] = v[:, :, 0].to(self.data.dtype)

    def view(self, layer: int, window: int, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `slots` slots (all by default), positions [0, window)."""
        n = self.slots if slots is None else slots
        return self.data[layer, 0, :n, :, :window], self.data[layer, 1, :n, :, :window]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a row's first `length` positions, every layer, from slot src to slot dst."""
        self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]


def window_for(max_position: int, max_len: int, bucket: int = WINDOW_BUCKET) -> int:
    """Cache positions a decode step must read when the furthest slot writes at `max_position`."""
    need = max_position + 1
    return min(max_len, -(-need // bucket) * bucket)


def attention_dims(text_config) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of a language model's config; llava-hf configs may omit the last two."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads, kv_heads, head_dim
