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


def encode_sharing(processor, request: Request, like: Encoded) -> Encoded:
    """Another prompt of `like`'s media without preprocessing the media again: `like`'s pixels, and
    the prompt tokenized as the processor's __call__ does, after expanding its placeholder to the
    count `like` has (the processors replace it, then run their tokenizer with its defaults)."""
    video = request.kind == "video"
    token = processor.video_token if video else processor.image_token
    token_id = processor.video_token_id if video else processor.image_token_id
    count = int((like.input_ids == token_id).sum())
    if request.prompt.count(token) != 1:
        raise ValueError(f"a prompt sharing media must hold one {token} placeholder")
    ids = processor.tokenizer(request.prompt.replace(token, token * count), return_tensors="pt")["input_ids"][0]
    return Encoded(ids, like.pixels, like.image_sizes)


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
    """Prompt embeddings [n_i, hidden] of rows that share one media kind. Rows holding the same pixel
    tensor (prompts of one media, encode_sharing) go through the vision tower once."""
    config = model.config
    token = config.video_token_id if kind == "video" else config.image_token_id
    table = model.model.get_input_embeddings()
    unique = {id(r.pixels): r for r in rows}
    features = dict(zip(unique, _features(model, kind, list(unique.values()), dtype, device), strict=True))
    out = []
    for row in rows:
        features_of_row = features[id(row.pixels)]
        ids = row.input_ids.to(device)
        x = table(ids)
        place = ids == token
        if int(place.sum()) != features_of_row.shape[0]:
            raise ValueError(f"{int(place.sum())} {kind} tokens in the prompt but "
                             f"{features_of_row.shape[0]} features")
        x[place] = features_of_row.to(x.dtype)
        out.append(x)
    return out
