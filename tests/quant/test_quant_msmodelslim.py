"""Interop with msModelSlim itself (the `quant` extra): same int8, same scales, same captions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import quant
from pipeline.testing.jobs import read_tensors
from quant.linear import W8A16Linear

pytest.importorskip("msmodelslim")


@pytest.fixture(scope="module")
def dirs(tiny_model, tmp_path_factory):
    src = tiny_model("llava")
    root = tmp_path_factory.mktemp("ms")
    return {
        "src": src,
        "builtin": quant.quantize(src, root / "builtin", backend="builtin"),
        "msmodelslim": quant.quantize(src, root / "ms", backend="msmodelslim"),
    }


def test_same_int8_and_scales(dirs):
    ours, theirs = read_tensors(dirs["builtin"]), read_tensors(dirs["msmodelslim"])
    assert set(ours) == set(theirs)
    desc_ours = quant.read_description(dirs["builtin"])
    assert desc_ours == quant.read_description(dirs["msmodelslim"])
    steps = []
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and t.shape == theirs[name].shape, name
        if t.dtype == torch.int8:
            steps.append((t.int() - theirs[name].int()).abs().max().item())
        else:  # scales, offsets and every FLOAT tensor: bit-identical
            assert torch.equal(t, theirs[name]), name
    assert steps and max(steps) <= 1  # msModelSlim divides in the model dtype: rounding differs
    assert quant.describe(dirs["msmodelslim"]) == "W8A16 per-channel (msModelSlim)"


def test_auto_prefers_msmodelslim(dirs, tmp_path):
    from quant.convert import resolve_backend

    assert resolve_backend("auto") == "msmodelslim"


def _captions(model_dir, processor):
    from transformers import LlavaForConditionalGeneration

    model = quant.load_quantized_model(LlavaForConditionalGeneration, model_dir,
                                       device=torch.device("cpu"), dtype=torch.float32)
    assert any(isinstance(m, W8A16Linear) for m in model.modules())
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(3)]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    out = []
    for image in images:
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        out.append(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def test_captions_identical_from_both_dirs(dirs):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(dirs["builtin"])
    ours, theirs = _captions(dirs["builtin"], processor), _captions(dirs["msmodelslim"], processor)
    assert ours == theirs and any(ours)


def test_msmodelslim_legacy_names_and_old_description_name(dirs, tmp_path):
    legacy = quant.quantize(dirs["src"], tmp_path / "legacy", backend="msmodelslim", names="legacy")
    tensors = read_tensors(legacy)
    assert "language_model.model.layers.1.mlp.down_proj.weight_scale" in tensors
    assert "language_model.lm_head.weight" in tensors
    assert json.loads((legacy / "quant_model_description.json").read_text())[
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] == "FLOAT"
    # a dir written by msModelSlim's older "safe_tensor" saver, without our provenance file
    old = tmp_path / "old"
    shutil.copytree(legacy, old)
    (old / "quant_model_description.json").rename(old / "quant_model_description_w8a16.json")
    (old / "llava_batch_quant.json").unlink()
    assert quant.is_quantized(old) and quant.describe(old) == "W8A16 per-channel (msModelSlim)"
    from transformers import LlavaForConditionalGeneration

    a = quant.load_quantized_model(LlavaForConditionalGeneration, old, device=torch.device("cpu"), dtype=torch.float32)
    b = quant.load_quantized_model(LlavaForConditionalGeneration, dirs["msmodelslim"],
                                   device=torch.device("cpu"), dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
