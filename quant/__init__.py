"""W8A16 (int8 weights, 16-bit activations) for the language model of LLaVA-family models.

Offline: `quantize()` writes msModelSlim's ascendV1 layout (builtin streaming converter or
msModelSlim itself). At load: `load_quantized_model()` swaps LM linears for `W8A16Linear`.

The names below are imported on first use: `quant.layout` (what a job's checks read, before any
work) must not pull in torch through this package's __init__, and a bad job exits before torch loads.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "quantize": "quant.convert",
    "QuantError": "quant.errors",
    "describe": "quant.layout",
    "is_quantized": "quant.layout",
    "read_description": "quant.layout",
    "W8A16Linear": "quant.linear",
    "load_quantized_model": "quant.load",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # `quant.families` after a bare `import quant`, as when this file imported everything
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise  # a submodule that exists but lacks one of its own imports
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
