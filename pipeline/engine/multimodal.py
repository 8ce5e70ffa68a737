"""Prompt embeddings of a request: text embeddings with the media features scattered in.

The vision tower, projector and LLaVA-NeXT tiling / NeXT-Video pooling are the model's own
`get_image_features` / `get_video_features`; we only do what `Llava*Model.forward` does after them
(scatter the features over the placeholder tokens), one row at a time and without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.engine.base import Request


@dataclass
class Encoded:
    """One request through the processor: token ids and pixel tensors on the CPU."""

    input_ids: torch.Tensor  # [n]
    pixels: torch.Tensor  # image: [patches, 3, h, w]; video: [1, frames, 3, h, w]
    image_sizes: torch.Tensor | None  # LLaVA-NeXT: [1, 2]


def encode(processor, request: Request) -> Encoded:
    """Processor on one row: no padding, so the ids are exactly the prompt's."""
    media = {"videos": [request.frames]} if request.kind == "video" else {"images": [request.image]}
    out = processor(text=[request.prompt], return_tensors="pt", **media)
    if request.kind == "video":
        pixels = out["pixel_values_videos"]
    else:
        pixels = out["pixel_values"]
        pixels = pixels[0] if pixels.dim() == 5 else pixels  # NeXT: [1, patches, ...] -> [patches, ...]
    return Encoded(out["input_ids"][0], pixels, out.get("image_sizes"))


def _features(model: nn.Module, kind: str, rows: list[Encoded], dtype: torch.dtype,
              device) -> list[torch.Tensor]:
    """Media features of every row in one vision-tower call; one [tokens, hidden] tensor per row."""
    pixels = torch.cat([r.pixels for r in rows]).to(device, dtype)
    if kind == "video":
        # Positional: the argument is `pixel_values` before transformers 5.18, `pixel_values_videos` since.
        out = model.model.get_video_features(pixels, return_dict=True).pooler_output
    else:
        kw = {}
        if rows[0].image_sizes is not None:
            kw["image_sizes"] = torch.cat([r.image_sizes for r in rows]).to(device)
        out = model.model.get_image_features(pixel_values=pixels, return_dict=True, **kw).pooler_output
    # Per row: a tensor (video: [frames * tokens, hidden]) or a list entry (NeXT tiles, [tokens, hidden]).
    return [f.reshape(-1, f.shape[-1]) for f in out]


def embed(model: nn.Module, kind: str, rows: list[Encoded], dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Prompt embeddings [n_i, hidden] of rows that share one media kind."""
    config = model.config
    token = config.video_token_id if kind == "video" else config.image_token_id
    table = model.model.get_input_embeddings()
    out = []
    for row, features in zip(rows, _features(model, kind, rows, dtype, device), strict=True):
        ids = row.input_ids.to(device)
        x = table(ids)
        place = ids == token
        if int(place.sum()) != features.shape[0]:
            raise ValueError(f"{int(place.sum())} {kind} tokens in the prompt but "
                             f"{features.shape[0]} features")
        x[place] = features.to(x.dtype)
        out.append(x)
    return out
