"""The memory plan (pipeline/engine/cache_plan.py) against values worked out by hand for the real
7B shapes, and its refusals. The prompt lengths come from the real processors' token arithmetic
(tests/model/test_prompt_length.py holds that to what the processors insert)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, LlavaNextVideoConfig

from pipeline.config import GenerationConfig
from pipeline.engine import cache_plan
from pipeline.engine.cache_plan import GIB, longest_job_prompt, plan_cache
from pipeline.errors import ConfigError
from pipeline.model.inspect import ModelInfo
from tests.model.test_prompt_length import REAL_PINPOINTS, real_size_processor

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
FP16 = torch.float16
PER_TOKEN_7B = 2 * 32 * 32 * 128 * 2  # k and v, 32 layers, 32 kv heads of 128, fp16: 512 KiB a position


def config_7b(family: str):
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)
    if family == "llava":
        return LlavaConfig(text_config=text, vision_config=vision)
    if family == "llava_next":
        return LlavaNextConfig(text_config=text, vision_config=vision, image_grid_pinpoints=REAL_PINPOINTS)
    return LlavaNextVideoConfig(text_config=text, vision_config=vision, image_grid_pinpoints=REAL_PINPOINTS)


def prompt_of(family: str, gen: GenerationConfig) -> tuple[int, int]:
    """(the job's longest prompt, the same prompt with no text): the media part by subtraction."""
    processor = real_size_processor(family)
    info = ModelInfo(Path(family), family, {}, False)
    bare = GenerationConfig(prompt="", video_frames=gen.video_frames)
    return longest_job_prompt(processor, info, gen), longest_job_prompt(processor, info, bare)


@pytest.mark.parametrize("family,media", [
    ("llava", 576),  # 24 x 24 patches of a 336 crop
    ("llava_next", 576 + 48 * 49),  # the base tile + the 2x2 grid, a newline ending each of its 48 rows
    ("llava_next_video", 576 + 48 * 49),  # its images outgrow 8 frames x 144 pooled tokens
])
def test_slots_and_slot_length_by_hand(family, media):
    gen = GenerationConfig(max_output_length=256, video_frames=8)
    prompt, bare = prompt_of(family, gen)
    assert bare - media in range(5, 40)  # the chat template around the media: tens of tokens, not hundreds
    plan = plan_cache(config_7b(family), gen, prompt, CUDA, FP16, free_bytes=100 * GIB)
    assert plan.prompt_length == prompt and plan.slot_length == prompt + 256
    assert plan.bytes_per_slot == PER_TOKEN_7B * (prompt + 256)
    # One refill prefills at most 16384 tokens: whole prompts only.
    rows = 16384 // prompt
    assert plan.prefill_rows == rows
    tiles = {"llava": 1, "llava_next": 5, "llava_next_video": 8}[family]  # base + 2x2 tiles; 8 frames
    reserve = (rows * prompt * 2 * (6 * 4096 + 3 * 11008)  # hidden, q/k/v, gate/up and their product, fp16
               + rows * 32064 * 4  # fp32 logits of each prompt's last token
               + rows * tiles * 2 * 577 * (25 * 1024 + 4096))  # 25 hidden states of 577 patches + one MLP
    assert plan.reserve_bytes == reserve
    assert plan.slots == (int(100 * GIB * 0.9) - reserve) // plan.bytes_per_slot
    assert plan.limited_by == "memory"


def test_videos_by_hand():
    """A next-video job that the frames bound: 24 frames x 144 pooled tokens outgrow an image."""
    gen = GenerationConfig(max_output_length=128, video_frames=24)
    prompt, bare = prompt_of("llava_next_video", gen)
    assert bare - 24 * 144 in range(5, 40)
    plan = plan_cache(config_7b("llava_next_video"), gen, prompt, CUDA, FP16, free_bytes=60 * GIB)
    assert plan.slot_length == prompt + 128


def test_max_input_length_caps_the_slot():
    gen = GenerationConfig(max_input_length=1000, max_output_length=64)
    prompt, _ = prompt_of("llava_next", gen)
    plan = plan_cache(config_7b("llava_next"), gen, prompt, CUDA, FP16, free_bytes=100 * GIB)
    assert prompt > 2900 and (plan.prompt_length, plan.slot_length) == (1000, 1064)


def test_caps_on_a_big_device_and_on_the_cpu():
    gen = GenerationConfig(max_output_length=64)
    big = plan_cache(config_7b("llava"), gen, 600, CUDA, FP16, free_bytes=10_000 * GIB)
    assert (big.slots, big.limited_by) == (cache_plan.ACCELERATOR_MAX_SLOTS, "cap")
    cpu = plan_cache(config_7b("llava"), gen, 600, CPU, torch.float32, free_bytes=200 * GIB)
    assert (cpu.slots, cpu.limited_by) == (cache_plan.CPU_MAX_SLOTS, "cap")


def test_an_explicit_batch_size_is_kept_or_refused():
    gen = GenerationConfig(max_batch_size=12, max_output_length=64)
    plan = plan_cache(config_7b("llava"), gen, 600, CUDA, FP16, free_bytes=80 * GIB)
    assert (plan.slots, plan.limited_by) == (12, "max_batch_size")
    with pytest.raises(ConfigError, match=r"max_batch_size=12 x 664 positions .* GiB free"):
        plan_cache(config_7b("llava"), gen, 600, CUDA, FP16, free_bytes=4 * GIB)


def test_nothing_fits_is_one_config_error():
    with pytest.raises(ConfigError, match="one slot x 2993 positions"):
        plan_cache(config_7b("llava_next"), GenerationConfig(), 2865, CUDA, FP16, free_bytes=1 * GIB)


def test_unknown_free_memory_takes_the_cap():
    plan = plan_cache(config_7b("llava"), GenerationConfig(), 600, CPU, torch.float32, free_bytes=None)
    assert plan.slots == cache_plan.CPU_MAX_SLOTS and plan.free_bytes is None
    assert f"cache plan on cpu: {cache_plan.CPU_MAX_SLOTS} slots x 728 positions" in plan.line(CPU)
