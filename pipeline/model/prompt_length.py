"""The longest prompt a job can produce, in tokens after the processor expands its media placeholder,
so a KV cache can be sized per slot before any row is read.

The counts follow the processors' own arithmetic (`replace_image_token` / `replace_video_token` of
transformers' LlavaProcessor, LlavaNextProcessor and LlavaNextVideoProcessor) from their settings, so
they hold for every image and video, not only the ones a test happened to try.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.model.inspect import ModelInfo

_KINDS = ("image", "video")


def media_tokens(processor, kind: str, video_frames: int) -> int:
    """The most tokens one `kind` placeholder ("image" | "video") of `processor` expands to."""
    if kind not in _KINDS:
        raise ValueError(f"unknown media kind {kind!r}; expected one of {', '.join(_KINDS)}")
    if kind == "video":
        return _video_tokens(processor, video_frames)
    if getattr(processor.image_processor, "image_grid_pinpoints", None):
        return _anyres_image_tokens(processor)
    return _fixed_image_tokens(processor)


def longest_prompt(processor, info: ModelInfo, texts: Iterable[str], kinds: Iterable[str],
                   video_frames: int) -> int:
    """The most tokens any of `texts` makes as a prompt of any of `kinds`, media expanded."""
    # Imported here: the loader imports torch, and the bounds here are wanted before the model loads.
    from pipeline.model.loader import build_prompt

    kinds = list(dict.fromkeys(kinds))
    media = {kind: media_tokens(processor, kind, video_frames) for kind in kinds}
    longest = 0
    for text in dict.fromkeys(texts):
        for kind in kinds:
            ids = _prompt_ids(processor, build_prompt(processor, info, text, kind))
            placeholders = ids.count(getattr(processor, f"{kind}_token_id"))
            longest = max(longest, len(ids) + placeholders * (media[kind] - 1))
    if not longest:
        raise ValueError("longest_prompt needs at least one text and one media kind")
    return longest


def text_token_bound(n_bytes: int) -> int:
    """An upper bound on the tokens a UTF-8 prompt text of `n_bytes` bytes adds to a prompt."""
    # Every token of the tokenizers these families ship covers at least one byte of its input:
    # sentencepiece falls back to one token per byte for characters outside its vocabulary, byte-level
    # BPE merges bytes, and the tiny models' word-level one makes at most one token per character.
    # Two more cover tokens that stand for none of the text's bytes: sentencepiece's dummy prefix (the
    # leading space it adds before a segment), and the template token the text lands inside, which the
    # text cuts in two.
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
    return n_bytes + 2


def _prompt_ids(processor, prompt: str) -> list[int]:
    # As the processor tokenizes the expanded text in its __call__: the tokenizer's defaults, so BOS
    # is added exactly when the engine's inputs have it.
    return list(processor.tokenizer(prompt)["input_ids"])


def _fixed_image_tokens(processor) -> int:
    """LlavaProcessor: one feature per patch of the processed image, plus the extra (CLS) ones."""
    height, width = _processed_size(processor.image_processor)
    return _patch_grid(processor, height, width) + _extra_image_tokens(processor)


def _anyres_image_tokens(processor) -> int:
    """LLaVA-NeXT: the base tile's features, then the largest pinpoint grid with a newline per row.

    An image whose aspect ratio matches a pinpoint exactly is resized onto it with no padding, so
    unpadding removes nothing and that pinpoint's whole grid is reached; any other image loses rows or
    columns to unpadding, never gains them.
    """
    height, width = _processed_size(processor.image_processor)
    patch = _patch_size(processor)
    rows, cols = height // patch, width // patch
    grids = []
    for pin_height, pin_width in processor.image_processor.image_grid_pinpoints:
        grid_rows, grid_cols = rows * (pin_height // height), cols * (pin_width // width)
        grids.append(grid_rows * (grid_cols + 1))
    return rows * cols + max(grids) + _extra_image_tokens(processor)


def _video_tokens(processor, video_frames: int) -> int:
    """LLaVA-NeXT-Video: each frame's patch grid, pooled 2x2, for every frame."""
    sub = getattr(processor, "video_processor", None)
    if sub is None or getattr(processor, "video_token", None) is None:
        raise ValueError(f"{type(processor).__name__} takes no videos")
    if video_frames < 1:
        raise ValueError(f"video_frames must be >= 1, got {video_frames}")
    height, width = _processed_size(sub)
    # The processor divides the unpooled count by four, whatever the grid's parity.
    return _patch_grid(processor, height, width) // 4 * video_frames


def _extra_image_tokens(processor) -> int:
    # "default" feature selection drops the CLS feature that num_additional_image_tokens counts.
    extra = processor.num_additional_image_tokens
    return extra - 1 if processor.vision_feature_select_strategy == "default" else extra


def _patch_grid(processor, height: int, width: int) -> int:
    patch = _patch_size(processor)
    return (height // patch) * (width // patch)


def _patch_size(processor) -> int:
    if not processor.patch_size:
        raise ValueError(f"{type(processor).__name__} has no patch_size: its media token count is unknown")
    return processor.patch_size


def _processed_size(sub) -> tuple[int, int]:
    """(height, width) of every image, tile or frame the image / video processor hands the model."""
    crop, size = sub.crop_size or {}, sub.size or {}
    if sub.do_center_crop and crop.get("height"):
        return crop["height"], crop["width"]
    if size.get("height"):
        return size["height"], size["width"]
    # Resized by its shortest edge and not cropped, each input keeps its own aspect ratio.
    raise ValueError(f"{type(sub).__name__} neither crops nor resizes to a fixed size: "
                     "its media token count depends on each input")
