"""The LLaVA families llava-batch runs: config.json's model_type -> its transformers class.

The one table of them, read by the loader, the W8A16 converter and the benchmarks. All share the
llava-hf tensor layout, which is what lets the converter treat them alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:  # torch is imported on use: inspecting a model dir must not load it
    import torch

CLASS_NAMES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
}


def model_class(class_name: str) -> type:
    import transformers

    return getattr(transformers, class_name)


def class_name(config: dict, where) -> str:
    """The transformers class of a config.json dict: a known one among its architectures, else its
    model_type's; ConfigError for a family not in the table."""
    known = set(CLASS_NAMES.values())
    for arch in config.get("architectures") or []:
        if arch in known:
            return arch
    if config.get("model_type") in CLASS_NAMES:
        return CLASS_NAMES[config["model_type"]]
    found = config.get("architectures") or config.get("model_type")
    raise ConfigError(f"{where}: unsupported model family {found!r} (known: {', '.join(sorted(CLASS_NAMES))})")


def meta_model(model_dir) -> torch.nn.Module:
    """The model of `model_dir` with every parameter on the meta device: its modules and shapes, no
    memory, no init (a 34B model costs nothing)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(model_dir), local_files_only=True)
    cls = model_class(class_name(config.to_dict(), model_dir))
    with torch.device("meta"):
        return cls(config)
