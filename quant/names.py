"""Tensor name schemes of llava-hf checkpoints, and the conversion between them.

Three spellings of the same tensor exist in the wild (checked against transformers 5.24):
- "hf": the module names of a transformers-5 model (`model.state_dict()`), which is also what
  msModelSlim writes since it walks `named_modules()`:
  model.language_model.layers.N..., model.vision_tower.encoder..., model.multi_modal_projector...,
  model.image_newline, lm_head.weight.
- "legacy": the transformers-4.42 names in the llava-hf hub checkpoints, the names MindIE's
  llava loader reads: language_model.model.layers.N..., language_model.lm_head.weight,
  vision_tower.vision_model.encoder..., multi_modal_projector..., image_newline.
- transformers-5 `save_pretrained` output: it reverses its own conversion mapping, so it writes
  language_model.model... / language_model.lm_head but vision_tower.encoder... (no vision_model).
Every input spelling is first brought to "hf" (`to_hf`); output goes to "hf" or "legacy".
"""

from __future__ import annotations

SCHEMES = ("hf", "legacy")

# (legacy name, hf name) of the same tensors: a name ending in "." is a prefix, any other a whole name.
_LEGACY_HF = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
]

# save_pretrained's vision_tower.encoder... is tried after the legacy vision_tower.vision_model. prefix.
_TO_HF = [*_LEGACY_HF, ("vision_tower.", "model.vision_tower.")]
_TO_LEGACY = [(hf, legacy) for legacy, hf in _LEGACY_HF]


def _apply(rules, name: str) -> str:
    """`name` respelled by the first (from, to) rule that matches it, else as it is."""
    for old, new in rules:
        if name == old or (old.endswith(".") and name.startswith(old)):
            return new + name[len(old):]
    return name


def to_hf(name: str) -> str:
    """Any of the three spellings -> the transformers-5 module name."""
    if name.startswith(("model.", "lm_head.")):
        return name
    return _apply(_TO_HF, name)


def to_scheme(hf_name: str, scheme: str) -> str:
    """An hf name -> the requested output scheme."""
    if scheme == "hf":
        return hf_name
    if scheme == "legacy":
        return _apply(_TO_LEGACY, hf_name)
    raise ValueError(f"unknown name scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")

