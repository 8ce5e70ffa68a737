"""Build a transformers model from a W8A16 dir without ever materialising float LM weights.

The model is constructed with parameters on the meta device (buffers such as rotary inv_freq are
computed for real, as transformers does), quantized linears are swapped for W8A16Linear holding
int8 weights on the target device, and every tensor is then streamed from the weight files
straight to its place: FLOAT tensors cast to `dtype`, int8 weights kept int8. Both name schemes
(hf / legacy) and both description file names are accepted, whoever wrote the dir.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pipeline.logs import log
from quant import layout, names
from quant.errors import QuantError
from quant.linear import W8A16Linear


@contextlib.contextmanager
def params_on_meta(dtype: torch.dtype):
    """Parameters go to meta as they are registered; buffers stay real (they are tiny and some,
    like rotary inv_freq, are computed in __init__ and never stored in checkpoints)."""
    from transformers.initialization import no_init_weights

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    previous = torch.get_default_dtype()
    nn.Module.register_parameter = on_meta
    torch.set_default_dtype(dtype)  # as from_pretrained(dtype=...) does while building
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = register
        torch.set_default_dtype(previous)


def _scale_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """hf module name -> weight_scale shape, read from headers only."""
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".weight_scale"):
                    shapes[names.to_hf(key)[: -len(".weight_scale")]] = tuple(f.get_slice(key).get_shape())
    return shapes


def _swap_linears(model: nn.Module, desc: dict, files, device, dtype) -> int:
    """Replace each linear the description marks W8A16 by an empty W8A16Linear; returns group size."""
    scale_shapes = _scale_shapes(files)
    group = 0
    for key, qtype in desc.items():
        if qtype != "W8A16" or not key.endswith(".weight"):
            continue  # a linear whose .weight is FLOAT stays a float layer
        name = names.to_hf(key)[: -len(".weight")]
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear) or name not in scale_shapes:
            raise QuantError(f"{key}: marked W8A16 but is not a linear with a weight_scale")
        groups = scale_shapes[name][1] if len(scale_shapes[name]) == 2 else 1
        group = int(desc.get("group_size") or 0) or (old.in_features // groups if groups > 1 else 0)
        new = W8A16Linear(old.in_features, old.out_features, old.bias is not None, group_size=group,
                          device=device, dtype=dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return group


def _place(model: nn.Module, name: str, tensor: torch.Tensor, device, dtype) -> bool:
    """Put one checkpoint tensor where it belongs; False if the model has no such tensor."""
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return False
    if isinstance(mod, W8A16Linear) and attr in ("weight", "weight_scale", "weight_offset"):
        target = getattr(mod, attr)
        if tuple(tensor.shape) != tuple(target.shape):
            raise QuantError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(target.shape)}")
        target.copy_(tensor.reshape(target.shape))  # int8 stays int8; scales cast to dtype
        return True
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if attr in mod._parameters:
        if tuple(mod._parameters[attr].shape) != tuple(value.shape):
            raise QuantError(f"{name}: shape {tuple(value.shape)} != expected {tuple(mod._parameters[attr].shape)}")
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        return False
    return True


@torch.no_grad()
def load_quantized_model(model_cls, model_dir, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A ready-to-run (eval) model from a W8A16 dir, quantized linears as W8A16Linear on `device`."""
    from transformers import AutoConfig

    model_dir, device = Path(model_dir), torch.device(device)
    desc = layout.read_description(model_dir)
    files = layout.weight_files(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    with params_on_meta(dtype):
        model = model_cls(config)
    model.quant_group_size = _swap_linears(model, desc, files, device, dtype)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if not _place(model, names.to_hf(key), f.get_tensor(key), device, dtype):
                    log.warning("%s: tensor %s has no place in %s, ignored", path.name, key, model_cls.__name__)
    missing = settle(model, device, dtype)
    if missing:
        raise QuantError(f"{model_dir}: weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    return model.eval()


def settle(model: nn.Module, device, dtype: torch.dtype, left_on_meta=lambda name: False) -> list[str]:
    """Finish a model built on meta and filled tensor by tensor: tie what its config ties, move its
    buffers to `device`, pick each W8A16Linear's kernel. Returns the parameters still without
    weights (other than those `left_on_meta` says may stay there); nothing is finished then."""
    def absent() -> list[str]:
        return [n for n, p in model.named_parameters() if p.device.type == "meta" and not left_on_meta(n)]

    if absent():
        model.tie_weights()  # e.g. lm_head tied to embed_tokens in configs that say so
    missing = absent()
    if missing:
        return missing
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)
        if isinstance(mod, W8A16Linear):
            mod.finalize()
    model.config.dtype = dtype
    return []
