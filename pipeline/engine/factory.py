"""Which engine a job gets (`[generation] engine`), and whether its KV cache fits the device."""

from __future__ import annotations

import torch

from pipeline import devices
from pipeline.config import GenerationConfig
from pipeline.engine.base import Engine
from pipeline.engine.fast import FastEngine
from pipeline.engine.hf import HFEngine
from pipeline.engine.runner import cache_shape
from pipeline.errors import ConfigError
from pipeline.logs import log
from pipeline.model import decoder

# Generation settings transformers would apply that the fast engine does not implement.
_HF_ONLY = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": None, "min_length": 0,
            "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "num_beams": 1}


def make_engine(model, processor, gen: GenerationConfig, device: torch.device) -> Engine:
    """The engine `[generation] engine` asks for; "fast" falls back to "hf" (saying why) when it must."""
    if gen.engine == "fast":
        reason = unsupported(model)
        if reason is None:
            return FastEngine(model, processor, gen, device, compile=gen.compile)
        log.warning(f"using the hf engine: {reason}")
    return HFEngine(model, processor, gen, device)


def unsupported(model) -> str | None:
    """Why the fast engine cannot run `model` token-exactly (None: it can)."""
    try:
        decoder.check_supported(model)
    except ValueError as e:
        return str(e)
    gen = model.generation_config
    for name, default in _HF_ONLY.items():
        if getattr(gen, name, default) not in (default, None):
            return f"generation_config.{name} = {getattr(gen, name)!r} is only applied by the hf engine"
    return None


def check_cache_fits(text_config, gen: GenerationConfig, device: torch.device, dtype: torch.dtype) -> None:
    """A KV cache the device cannot hold is a configuration error, raised before the weights load.

    It is sized max_batch_size x (max_input_length + max_output_length): a 7B model at the defaults
    (8 x 4224) needs 17 GB, the first thing to shrink on a smaller card.
    """
    layers, slots, kv_heads, length, head_dim = cache_shape(text_config, gen)
    itemsize = devices.kv_cache_dtype(device, dtype).itemsize
    need = 2 * layers * slots * kv_heads * length * head_dim * itemsize
    free = devices.free_memory_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ConfigError(
            f"the KV cache for generation.max_batch_size={slots} x "
            f"(max_input_length + max_output_length)={length} "
            f"needs {need / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free; lower "
            "generation.max_input_length (llava-1.5 prompts are ~650 tokens, llava-v1.6 up to ~3000) "
            "or generation.max_batch_size")
