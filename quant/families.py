"""Which model families the converter knows, and which of their tensors become W8A16.

The quantized set is decided from the model itself (every nn.Linear under the language model
except lm_head), built on the meta device from config.json: no weight is read and a 34B model
costs no memory, and a naming guess can never pick up a norm or an embedding by mistake.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quant.errors import QuantError

# architectures (config.json) -> transformers class name; all share the llava-hf tensor layout.
KNOWN_ARCHITECTURES = {
    "LlavaForConditionalGeneration": "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "LlavaNextForConditionalGeneration",
    "LlavaNextVideoForConditionalGeneration": "LlavaNextVideoForConditionalGeneration",
}
_MODEL_TYPES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
}
LM_PREFIX = "model.language_model."  # hf name of the language model's decoder stack


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise QuantError(f"{model_dir}: no config.json (not a Hugging Face model dir)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QuantError(f"{path}: invalid JSON ({e})") from e


def model_class_name(config: dict, where: Path) -> str:
    """The transformers class for a config dict, or QuantError for a family we do not know."""
    for arch in config.get("architectures") or []:
        if arch in KNOWN_ARCHITECTURES:
            return KNOWN_ARCHITECTURES[arch]
    if config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[config["model_type"]]
    found = config.get("architectures") or config.get("model_type")
    raise QuantError(f"{where}: unsupported model family {found!r} "
                     f"(known: {', '.join(sorted(_MODEL_TYPES))})")


def meta_model(model_dir: Path) -> nn.Module:
    """The model of `model_dir` with every parameter on the meta device (no memory, no init)."""
    import transformers

    cls = getattr(transformers, model_class_name(read_config(model_dir), model_dir))
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return cls(config)


def quantizable_linears(model: nn.Module) -> list[str]:
    """hf module names of the language-model linears that get int8 weights (lm_head stays float)."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and (name + ".").startswith(LM_PREFIX)]
