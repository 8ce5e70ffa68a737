"""The longest prompt, computed from the processors' settings, against what the real processors make:
never exceeded by any image, reached by the image that fills a pinpoint grid, exact for videos, and
the llava-hf checkpoints' own sizes counted by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, trainers
from transformers import (
    CLIPImageProcessor,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaProcessor,
)

from pipeline.config import ModelConfig
from pipeline.data.media import decode_media
from pipeline.model import loader
from pipeline.model.inspect import ModelInfo
from pipeline.model.prompt_length import longest_prompt, media_tokens, text_token_bound
from pipeline.testing.demo import write_video
from pipeline.testing.tiny_model import FAMILIES
from pipeline.testing.tiny_tokenizer import CHAT_TEMPLATES, IMAGE_ID, VIDEO_ID, build_tokenizer

TEXTS = ["describe this image briefly .", "", "please write a short detailed description of what is shown"]
# Shapes no pinpoint matches: wide, tall, tiny, and larger than any grid.
ODD_SHAPES = [(30, 97), (200, 50), (17, 300), (60, 45), (9, 9), (500, 430)]
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ADVERSARIAL = ["😀" * 7, "漢字とかなカナ", " " * 9, "a  b   c", "!?!?..", "İstanbul", "\n\t\r", "x😀y漢z",
               "describe 😀 the cat", "👩‍👩‍👧‍👦", "é" * 5 + "e\u0301" * 5]


def load(tiny_model, family: str, **kw):
    info = loader.inspect_model(ModelConfig(path=str(tiny_model(family, **kw))))
    return info, loader.load_processor(info)


def n_ids(processor, prompt: str, **media) -> int:
    """As the engine calls the processor: one row, no padding."""
    return len(processor(text=[prompt], return_tensors="pt", **media)["input_ids"][0])


def image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 1000 + width)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def image_count(processor, info, text: str, shape) -> int:
    return n_ids(processor, loader.build_prompt(processor, info, text, "image"), images=[image(*shape)])


@pytest.mark.parametrize("family,kw", [(f, {}) for f in FAMILIES] + [("llava", {"chat_template": False})])
def test_no_image_exceeds_the_longest_prompt_and_a_pinpoint_shape_reaches_it(tiny_model, family, kw):
    info, processor = load(tiny_model, family, **kw)
    sub = processor.image_processor
    exact = [tuple(p) for p in getattr(sub, "image_grid_pinpoints", None) or []]
    exact = exact or [(sub.crop_size["height"], sub.crop_size["width"])]  # llava-1.5: one fixed size
    per_text = []
    for text in TEXTS:
        bound = longest_prompt(processor, info, [text], ["image"], video_frames=8)
        reached = [image_count(processor, info, text, shape) for shape in exact]
        others = [image_count(processor, info, text, shape) for shape in ODD_SHAPES]
        assert max(reached + others) <= bound
        assert max(reached) == bound
        per_text.append(bound)
    assert longest_prompt(processor, info, TEXTS, ["image"], video_frames=8) == max(per_text)


@pytest.mark.parametrize("frames", [2, 4, 8])
def test_a_video_prompt_is_exactly_the_longest_video_prompt(tiny_model, tmp_path, frames):
    info, processor = load(tiny_model, "llava_next_video")
    with open(write_video(tmp_path / "v.mp4", n_frames=10, seed=frames), "rb") as f:
        video = decode_media(f, video_frames=frames).frames
    assert video.shape[0] == frames
    for text in TEXTS:
        prompt = loader.build_prompt(processor, info, text, "video")
        assert n_ids(processor, prompt, videos=[video]) == longest_prompt(processor, info, [text], ["video"],
                                                                          video_frames=frames)
    both = longest_prompt(processor, info, TEXTS, ["image", "video"], video_frames=frames)
    assert both == max(longest_prompt(processor, info, TEXTS, [kind], video_frames=frames)
                       for kind in ("image", "video"))


def real_size_processor(family: str):
    """The llava-hf checkpoints' image settings around the tiny tokenizer: built in memory, offline."""
    size = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    common = dict(tokenizer=build_tokenizer(), patch_size=14, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1, chat_template=CHAT_TEMPLATES[family])
    if family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessor(**size), **common)
    images = LlavaNextImageProcessor(image_grid_pinpoints=REAL_PINPOINTS, **size)
    if family == "llava_next":
        return LlavaNextProcessor(image_processor=images, **common)
    return LlavaNextVideoProcessor(video_processor=LlavaNextVideoVideoProcessor(**size),
                                   image_processor=images, **common)


def placeholders(processor, prompt: str, token: int, **media) -> int:
    return processor(text=[prompt], return_tensors="pt", **media)["input_ids"][0].tolist().count(token)


@pytest.mark.parametrize("family,shape,expected", [
    ("llava", (480, 640), (336 // 14) ** 2),  # one feature per patch; "default" drops the CLS again
    # the base tile, then the 2x2-tile grid with a newline feature ending each of its rows
    ("llava_next", (672, 672), (336 // 14) ** 2 + (672 // 14) * (672 // 14 + 1)),
    ("llava_next_video", (672, 672), (336 // 14) ** 2 + (672 // 14) * (672 // 14 + 1)),
])
def test_the_real_checkpoints_image_counts_by_hand(family, shape, expected):
    processor = real_size_processor(family)
    info = ModelInfo(Path(family), family, {}, False)
    assert media_tokens(processor, "image", video_frames=8) == expected
    prompt = loader.build_prompt(processor, info, TEXTS[0], "image")
    assert placeholders(processor, prompt, IMAGE_ID, images=[image(*shape)]) == expected
    assert n_ids(processor, prompt, images=[image(*shape)]) == longest_prompt(processor, info, [TEXTS[0]],
                                                                              ["image"], video_frames=8)


def test_the_real_next_video_counts_by_hand():
    processor = real_size_processor("llava_next_video")
    info = ModelInfo(Path("next-video"), "llava_next_video", {}, False)
    per_frame = (336 // 14 // 2) ** 2  # the frame's patch grid, average pooled 2x2
    assert media_tokens(processor, "video", video_frames=8) == 8 * per_frame == 1152
    frames = np.random.default_rng(0).integers(0, 255, (8, 336, 336, 3), dtype=np.uint8)
    prompt = loader.build_prompt(processor, info, TEXTS[0], "video")
    assert placeholders(processor, prompt, VIDEO_ID, videos=[frames]) == 1152
    # A job that sees both kinds is bounded by its image prompt: a NeXT image outgrows eight frames.
    both = longest_prompt(processor, info, [TEXTS[0]], ["image", "video"], video_frames=8)
    assert both == longest_prompt(processor, info, [TEXTS[0]], ["image"], video_frames=8)


def test_media_tokens_refuses_what_it_cannot_count():
    with pytest.raises(ValueError, match="takes no videos"):
        media_tokens(real_size_processor("llava"), "video", video_frames=8)
    with pytest.raises(ValueError, match="unknown media kind"):
        media_tokens(real_size_processor("llava"), "audio", video_frames=8)


def byte_fallback_tokenizer() -> Tokenizer:
    """Llama's kind of tokenizer: sentencepiece-style BPE with '▁' for spaces and byte fallback."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *byte_tokens], show_progress=False)
    tok.train_from_iterator(["a picture of a cat", "describe this image briefly", "the dog in the park"] * 5,
                            trainer)
    return tok


def test_the_text_bound_holds_for_adversarial_texts(tiny_model):
    tiny, spm = build_tokenizer(), byte_fallback_tokenizer()
    for text in ADVERSARIAL:
        bound = text_token_bound(len(text.encode()))
        assert len(tiny(text, add_special_tokens=False)["input_ids"]) <= bound
        assert len(spm.encode(text).ids) <= bound
    # Emoji fall back to a token per byte, after the '▁' prefix: one short of the bound.
    assert len(spm.encode("😀" * 7).ids) == 1 + len(("😀" * 7).encode()) == text_token_bound(28) - 1
    for family in FAMILIES:
        info, processor = load(tiny_model, family)
        empty = longest_prompt(processor, info, [""], ["image"], video_frames=8)
        for text in ADVERSARIAL:
            with_text = longest_prompt(processor, info, [text], ["image"], video_frames=8)
            assert with_text <= empty + text_token_bound(len(text.encode()))
