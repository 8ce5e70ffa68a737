"""The tiny models load with stock transformers classes and give non-degenerate greedy captions.

Non-degenerate matters: parity tests against HF generate are only meaningful when captions differ
between inputs and stop at EOS at different lengths.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from pipeline.testing.tiny_model import EOS_ID, FAMILIES, build_tiny_model

MODEL_CLASSES = {
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
    "llava_next_video": ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoProcessor"),
}
EXPECTED_PROMPTS = {
    "llava": "USER: <image>\nDescribe this image. ASSISTANT:",
    "llava_next": "[INST] <image>\nDescribe this image. [/INST]",
    "llava_next_video": "USER: <video>\nDescribe this image. ASSISTANT:",
}
MAX_NEW = 40


def _images(n: int = 8) -> list[Image.Image]:
    """Noise, flat colours and gradients of assorted sizes (a different draw from the calibration set)."""
    rng = np.random.default_rng(1234)
    images = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(24, 100, size=2))
        if i % 3 == 0:
            pixels = rng.integers(0, 256, (h, w, 3))
        elif i % 3 == 1:
            pixels = np.broadcast_to(rng.integers(0, 256, 3), (h, w, 3))
        else:
            pixels = np.linspace(0, 255, h)[:, None, None] * rng.random(3) + np.linspace(0, 255, w)[
                None, :, None
            ] * rng.random((1, 1, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    import transformers

    family = request.param
    path = build_tiny_model(tmp_path_factory.mktemp(family), family, preset="test", seed=0)
    model_cls = getattr(transformers, MODEL_CLASSES[family][0])
    model, info = model_cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return family, path, AutoProcessor.from_pretrained(path), model.eval(), info


def _prompt(processor, kind: str) -> str:
    conversation = [
        {"role": "user", "content": [{"type": kind}, {"type": "text", "text": "Describe this image."}]}
    ]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def _captions(processor, model, **inputs) -> tuple[list[str], list[int]]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    # Length before the first EOS; MAX_NEW when it never came.
    lengths = [int((row == EOS_ID).int().argmax()) if (row == EOS_ID).any() else MAX_NEW for row in new]
    return processor.batch_decode(new, skip_special_tokens=True), lengths


def _assert_diverse(captions: list[str], lengths: list[int]) -> None:
    assert len(set(captions)) >= len(captions) - 1, captions
    assert any(n < MAX_NEW for n in lengths), lengths  # some end at EOS before the limit
    assert len(set(lengths)) > 1, lengths
    assert all(c.strip() == " ".join(c.split()) for c in captions)  # words separated by single spaces


def test_loads_with_stock_classes(loaded):
    family, path, processor, model, info = loaded
    assert not any(info.values()), info  # no missing / unexpected / mismatched weights
    assert type(processor).__name__ == MODEL_CLASSES[family][1]
    assert processor.vision_feature_select_strategy == "default"
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id == EOS_ID
    assert model.generation_config.eos_token_id == EOS_ID


def test_chat_template_matches_real_checkpoints(loaded):
    family, _, processor, _, _ = loaded
    kind = "video" if family == "llava_next_video" else "image"
    assert _prompt(processor, kind) == EXPECTED_PROMPTS[family]


def test_image_captions_differ_and_stop(loaded):
    family, _, processor, model, _ = loaded
    images = _images()
    prompt = _prompt(processor, "image")
    inputs = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
    captions, lengths = _captions(processor, model, **inputs)
    _assert_diverse(captions, lengths)


def test_video_captions_differ(tmp_path):
    import transformers

    path = build_tiny_model(tmp_path / "video", "llava_next_video", preset="test", seed=0)
    processor = AutoProcessor.from_pretrained(path)
    model = getattr(transformers, MODEL_CLASSES["llava_next_video"][0]).from_pretrained(path).eval()
    rng = np.random.default_rng(7)
    videos = [rng.integers(0, 256, (4, 40, 52, 3), dtype=np.uint8) for _ in range(2)]
    videos += [np.stack([np.asarray(im.resize((52, 40)))] * 4) for im in _images(2)]
    prompt = _prompt(processor, "video")
    inputs = processor(videos=videos, text=[prompt] * len(videos), padding=True, return_tensors="pt")
    captions, lengths = _captions(processor, model, **inputs)
    assert len(set(captions)) >= 3, captions
    assert any(n < MAX_NEW for n in lengths), lengths


def test_bf16_forward_is_finite(loaded):
    family, path, processor, _, _ = loaded
    model = type(loaded[3]).from_pretrained(path, dtype=torch.bfloat16)
    images = _images(3)
    inputs = processor(
        images=images, text=[_prompt(processor, "image")] * 3, padding=True, return_tensors="pt"
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_without_chat_template(tmp_path):
    path = build_tiny_model(tmp_path, "llava", chat_template=False)
    assert AutoProcessor.from_pretrained(path).chat_template is None


def test_rejects_unknown_family_and_preset(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_tiny_model(tmp_path, "llava_onevision")
    with pytest.raises(ValueError, match="preset"):
        build_tiny_model(tmp_path, "llava", preset="huge")
