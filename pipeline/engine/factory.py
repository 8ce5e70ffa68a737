"""Which engine a job gets (`[generation] engine`)."""

from __future__ import annotations

import torch

from pipeline.config import GenerationConfig
from pipeline.engine.base import Engine
from pipeline.engine.cache_plan import CachePlan
from pipeline.engine.fast import FastEngine
from pipeline.engine.hf import HFEngine
from pipeline.engine.tp_steps import Leader
from pipeline.logs import log
from pipeline.model import decoder

# Generation settings transformers would apply that the fast engine does not implement.
_HF_ONLY = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": None, "min_length": 0,
            "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "num_beams": 1}


def make_engine(model, processor, gen: GenerationConfig, device: torch.device, plan: CachePlan | None = None,
                tp: Leader | None = None) -> Engine:
    """The engine `[generation] engine` asks for; "fast" falls back to "hf" (saying why) when it must.
    `gen.max_batch_size` is a number here: the plan's slots when the job said "auto"."""
    if gen.engine == "fast":
        reason = unsupported(model)
        if reason is None:
            return FastEngine(model, processor, gen, device, compile=gen.compile, plan=plan, tp=tp)
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
