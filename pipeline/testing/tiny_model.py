"""Random-weight LLaVA-family models in llava-hf layout, built offline for tests, demos and benchmarks.

`build_tiny_model(out_dir, family)` writes a directory that stock transformers classes load with
`from_pretrained` (config.json, model.safetensors, generation_config.json, tokenizer and processor
files). Nothing is downloaded: the tokenizer is a word-level vocabulary (tiny_tokenizer).

The weights are random but *not* default-initialised (tiny_weights): they are scaled so greedy captions
depend on the image and stop at EOS after a varied number of tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaProcessor,
)

from pipeline import families
from pipeline.testing.tiny_tokenizer import (
    BOS_ID,
    CHAT_TEMPLATES,
    EOS_ID,
    IMAGE_ID,
    PAD_ID,
    VIDEO_ID,
    build_tokenizer,
)
from pipeline.testing.tiny_weights import calibrate_eos, init_weights

FAMILIES = ("llava", "llava_next", "llava_next_video")
PRESETS = ("test", "bench", "llava-1.5-7b")
# Presets at a real checkpoint's shape, with its vocabulary size. Built without EOS calibration: that
# runs the model on the CPU, far too slow at 7B. Their EOS row stays zero like every non-word row, so greedy
# captions never stop early: they run to max_output_length, which is what a decode benchmark wants.
FULL_SIZE_VOCAB = {"llava-1.5-7b": 32064}


def build_tiny_model(
    out_dir,
    family: str,
    preset: str = "test",
    seed: int = 0,
    image_size: int | None = None,
    chat_template: bool = True,
    caption_median: int | None = None,
    heads: tuple[int, int] | None = None,
) -> Path:
    """Write a random-weight `family` model in llava-hf layout to `out_dir` and return its path.
    `heads`: the language model's (attention heads, KV heads) instead of the preset's (tensor
    parallel tests: 8 ranks need 8 of each; GQA)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    size = image_size or (28 if preset == "test" else 336)
    # 14 px patches, and an even patch grid so the video 2x2 average pooling divides it exactly.
    if size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (14 px patches, even grid), got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATES[family]  # calibration renders prompts with it
    config = _build_config(family, preset, size, FULL_SIZE_VOCAB.get(preset, len(tokenizer)))
    if heads is not None:
        config.text_config.num_attention_heads, config.text_config.num_key_value_heads = heads
        config.text_config.head_dim = config.text_config.hidden_size // heads[0]
    processor = _build_processor(family, config, tokenizer, size)
    if preset in FULL_SIZE_VOCAB:
        if caption_median is not None:
            raise ValueError(f"preset {preset!r} is built without EOS calibration: caption_median does not apply")
        model = _full_size_model(family, config, seed, len(tokenizer))
    else:
        with torch.random.fork_rng(devices=[]):  # the default init draws from (and would move) the global RNG
            model = families.model_class(families.CLASS_NAMES[family])(config).eval()
        init_weights(model, seed)  # every parameter, from its own generator: same seed, same bytes
        # Benchmarks ask for longer captions (decode-bound workloads); None keeps the test calibration.
        calibrate_eos(model, processor, seed, caption_median)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    # Full-size weights in 5 GB shards, as the llava-hf checkpoints ship them.
    model.save_pretrained(out, **({"max_shard_size": "5GB"} if preset in FULL_SIZE_VOCAB else {}))
    if not chat_template:
        processor.chat_template = tokenizer.chat_template = None
    processor.save_pretrained(out)
    return out


def _full_size_model(family: str, config, seed: int, n_tokens: int):
    """A model of a full-size preset in fp16 (what llava-hf checkpoints store), made without
    transformers' default init: init_weights overwrites every parameter anyway, and drawing 7B values
    twice on the CPU would double the build. Its non-persistent buffers (rope
    frequencies, CLIP position ids) are left unset: they are not saved, and loading recomputes them."""
    with torch.device("meta"):
        model = families.model_class(families.CLASS_NAMES[family])(config)
    model = model.to(dtype=torch.float16).to_empty(device="cpu").eval()
    init_weights(model, seed)
    with torch.no_grad():
        # The vocabulary keeps the checkpoint's size, past the tokenizer's few hundred words: rows no
        # token ever looks up, and lm_head rows silenced like init_weights' non-word rows, so greedy
        # captions stay words the tokenizer can decode.
        model.lm_head.weight[n_tokens:] = 0.0
    return model


def _build_config(family: str, preset: str, image_size: int, vocab_size: int):
    if preset == "test":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    elif preset == "llava-1.5-7b":  # Vicuna-7B (Llama, no GQA) behind CLIP ViT-L/14-336
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    else:
        text = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4)
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=text["num_attention_heads"],
        max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        **text,
    )
    vision_config = CLIPVisionConfig(image_size=image_size, patch_size=14, projection_dim=32, **vision)
    common = dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=IMAGE_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // 14) ** 2,
        tie_word_embeddings=False,
    )
    if family == "llava":
        return LlavaConfig(**common)
    pinpoints = _grid_pinpoints(image_size)
    if family == "llava_next":
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
    return LlavaNextVideoConfig(
        image_grid_pinpoints=pinpoints,
        video_token_index=VIDEO_ID,
        video_seq_length=(image_size // 28) ** 2,
        **common,
    )


def _grid_pinpoints(size: int) -> list[list[int]]:
    # The real checkpoints use 336 * {1x2, 2x1, 2x2, 3x1, 1x3}; the same shapes in tile units keep
    # any-resolution tiling exercised at a tiny token count.
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]


def _build_processor(family, config, tokenizer, size: int):
    image_kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # num_additional_image_tokens=1: CLIP's CLS token, which "default" feature selection drops again;
    # without it the processor inserts one <image> too few and the model raises a feature mismatch.
    common = dict(
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    if family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessor(**image_kwargs), **common)
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=config.image_grid_pinpoints, **image_kwargs
    )
    if family == "llava_next":
        return LlavaNextProcessor(image_processor=image_processor, **common)
    video_processor = LlavaNextVideoVideoProcessor(**image_kwargs)
    return LlavaNextVideoProcessor(video_processor=video_processor, image_processor=image_processor, **common)

