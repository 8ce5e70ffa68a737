"""W8A16 (int8 weights, 16-bit activations) for the language model of LLaVA-family models.

Offline: `quantize()` writes msModelSlim's ascendV1 layout (builtin streaming converter or
msModelSlim itself). At load: `load_quantized_model()` swaps LM linears for `W8A16Linear`.
"""

from quant.convert import quantize
from quant.errors import QuantError
from quant.layout import describe, is_quantized, read_description
from quant.linear import W8A16Linear
from quant.load import load_quantized_model

__all__ = ["QuantError", "W8A16Linear", "describe", "is_quantized", "load_quantized_model",
           "quantize", "read_description"]
