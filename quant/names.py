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

import re

SCHEMES = ("hf", "legacy")

# (pattern on a legacy / save_pretrained name, hf replacement); first match wins.
_TO_HF = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^image_newline$"), "model.image_newline"),
]
_TO_LEGACY = [
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower.vision_model."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.image_newline$"), "image_newline"),
]


def _apply(rules, name: str) -> str:
    for pattern, repl in rules:
        if pattern.search(name):
            return pattern.sub(repl, name, count=1)
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


def scheme_of(names) -> str:
    """Which scheme a set of tensor names uses ("hf" when any name is a transformers-5 module name)."""
    return "hf" if any(n.startswith(("model.", "lm_head.")) for n in names) else "legacy"
