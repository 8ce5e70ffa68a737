"""Tensor parallel weights: each rank builds the model on the meta device and reads only its shard
of every language-model linear straight from the safetensors files (slices, never the whole
tensor; W8A16 dirs: int8 rows or columns with their scales and offsets), as gpt-fast's tp.py shards them: q/k/v and gate/up by output rows (column parallel: each
rank holds whole heads), o/down by input columns (row parallel: their outputs are partial sums,
all-reduced by the decoder). Embeddings, norms and lm_head are replicated. The vision tower and
the projector are read by rank 0 only, which alone embeds prompts and sends the embeddings with
each step; on the other ranks they stay on meta and cost nothing.

Peak memory per rank is then about the language model / world size plus the replicated parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.inspect import ModelInfo
from pipeline.model.kv_cache import attention_dims

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")
RANK0_ONLY = ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")


@dataclass(frozen=True)
class Placement:
    rank: int
    world: int


def check_divides(text_config, world: int) -> None:
    """ConfigError unless `world` ranks can each hold whole attention and KV heads (and MLP columns)."""
    heads, kv_heads, _ = attention_dims(text_config)
    for what, n in (("attention heads", heads), ("KV heads", kv_heads),
                    ("MLP columns", text_config.intermediate_size)):
        if n % world:
            raise ConfigError(f"run.tensor_parallel = {world} does not divide the model's {n} {what}")


def _kind(name: str) -> str | None:
    """"column", "row" or None (replicated) for an hf parameter name."""
    if not name.startswith("model.language_model.layers."):
        return None
    module = name.rsplit(".", 1)[0]
    if module.endswith(COLUMN):
        return "column"
    if module.endswith(ROW):
        return "row"
    return None


def _swap_linears(model: nn.Module, world: int) -> None:
    """Every sharded linear replaced by an empty one of its shard's shape (on meta)."""
    for name, module in list(model.named_modules()):
        kind = _kind(name + ".weight")
        if kind is None or not isinstance(module, nn.Linear):
            continue
        out_f, in_f = module.out_features, module.in_features
        shape = (out_f // world, in_f) if kind == "column" else (out_f, in_f // world)
        new = nn.Linear(shape[1], shape[0], bias=module.bias is not None, device="meta", dtype=module.weight.dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def _shard(f, key: str, kind: str | None, attr: str, place: Placement) -> torch.Tensor:
    """This rank's part of one checkpoint tensor, read as a slice. W8A16 scales and offsets
    ([out, groups]) follow their weight's rows; by columns only when there are groups to split."""
    view = f.get_slice(key)
    shape = view.get_shape()
    if kind == "column":
        step = shape[0] // place.world
        return view[place.rank * step:(place.rank + 1) * step]
    if kind == "row" and (attr == "weight" or attr in _QUANT_PARAMS and shape[1] > 1):
        step = shape[1] // place.world
        return view[:, place.rank * step:(place.rank + 1) * step]
    if kind == "row" and attr == "bias":  # added once, after the all-reduce sums the shards
        tensor = view[:]
        return tensor if place.rank == 0 else torch.zeros_like(tensor)
    return view[:]


_QUANT_PARAMS = ("weight_scale", "weight_offset")


def _swap_quantized(model: nn.Module, info: ModelInfo, world: int, device, dtype) -> None:
    """The linears a W8A16 dir's description marks quantized become empty W8A16Linears of their
    shard's shape (their int8 weights are streamed in next, never a float copy)."""
    from quant import layout, names
    from quant.linear import W8A16Linear

    desc = layout.read_description(info.path)
    for key, qtype in desc.items():
        if qtype != "W8A16" or not key.endswith(".weight"):
            continue
        name = names.to_hf(key)[: -len(".weight")]
        old = model.get_submodule(name)
        kind = _kind(name + ".weight")
        full_in = old.in_features * (world if kind == "row" else 1)
        group = int(desc.get("group_size") or 0)
        if group and kind == "row" and (full_in // world) % group:
            raise ConfigError(f"{key}: W8A16 group size {group} does not divide this rank's {full_in // world} columns")
        new = W8A16Linear(old.in_features, old.out_features, old.bias is not None, group_size=group,
                          device=device, dtype=dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


@torch.no_grad()
def load_shard(model_cls, info: ModelInfo, device: torch.device, dtype: torch.dtype, place: Placement) -> nn.Module:
    """This rank's model: sharded language-model linears, replicated rest (rank 0 only: the vision
    side), everything else left on meta."""
    from transformers import AutoConfig

    from quant import names
    from quant.load import params_on_meta, settle

    config = AutoConfig.from_pretrained(info.path, local_files_only=True)
    check_divides(config.text_config, place.world)
    with params_on_meta(dtype):
        model = model_cls(config)
    _swap_linears(model, place.world)
    if info.quantized:
        _swap_quantized(model, info, place.world, device, dtype)
    files = sorted(Path(info.path).glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = names.to_hf(key)
                if place.rank and name.startswith(RANK0_ONLY):
                    continue
                mod_name, _, attr = name.rpartition(".")
                tensor = _shard(f, key, _kind(name), attr, place).contiguous()  # kernels want whole rows
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                _put(model.get_submodule(mod_name), attr, tensor.to(device), name)
    missing = settle(model, device, dtype, lambda name: place.rank > 0 and name.startswith(RANK0_ONLY))
    if missing:
        raise ConfigError(f"{info.path}: weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    model.tensor_parallel = place
    return model.eval()


def _put(module: nn.Module, attr: str, value: torch.Tensor, name: str) -> None:
    if attr in module._buffers and module._buffers[attr] is not None \
            and tuple(module._buffers[attr].shape) != tuple(value.shape):
        # a W8A16 scale stored [out] rather than [out, 1] reshapes; anything else is a wrong shard
        if module._buffers[attr].numel() != value.numel():
            raise ConfigError(f"{name}: shard shape {tuple(value.shape)} != {tuple(module._buffers[attr].shape)}")
        value = value.reshape(module._buffers[attr].shape)
    if attr in module._parameters:
        if tuple(module._parameters[attr].shape) != tuple(value.shape):
            raise ConfigError(f"{name}: shard shape {tuple(value.shape)} != {tuple(module._parameters[attr].shape)}")
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
