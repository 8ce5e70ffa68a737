"""Which of a model's tensors become W8A16, and the family checks the converter makes first.

The quantized set is decided from the model itself (every nn.Linear under the language model
except lm_head), built on the meta device from config.json (pipeline.families.meta_model): no
weight is read, and a naming guess can never pick up a norm or an embedding by mistake.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline import families
from pipeline.errors import ConfigError
from quant.errors import QuantError

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
    try:
        return families.class_name(config, where)
    except ConfigError as e:
        raise QuantError(str(e)) from None


def quantizable_linears(model: nn.Module) -> list[str]:
    """hf module names of the language-model linears that get int8 weights (lm_head stays float)."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and (name + ".").startswith(LM_PREFIX)]
