"""The loader reads the one family table, spots W8A16 dirs as quant does, and says its dtype
fallback once."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import quant
from pipeline import devices, families, logs
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model import loader

CPU = torch.device("cpu")


def test_the_loader_and_the_converter_share_one_family_table(tmp_path):
    assert {f: c.__name__ for f, c in loader.MODEL_CLASSES.items()} == families.CLASS_NAMES
    # architectures first (what the weights were saved as), then model_type
    assert families.class_name({"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "x"},
                               "d") == "LlavaNextForConditionalGeneration"
    assert families.class_name({"model_type": "llava_next_video"}, "d") == "LlavaNextVideoForConditionalGeneration"
    with pytest.raises(ConfigError, match="unsupported model family 'bert'"):
        families.class_name({"model_type": "bert"}, "d")
    with pytest.raises(quant.QuantError, match="unsupported model family"):
        quant.families.model_class_name({"model_type": "bert"}, tmp_path)


def test_quant_errors_are_config_errors():
    assert issubclass(quant.QuantError, ConfigError) and quant.QuantError("x").exit_code == 2


def test_a_dir_with_either_description_name_is_quantized(tiny_model, tmp_path):
    src = tiny_model("llava")
    for i, name in enumerate(("quant_model_description.json", "quant_model_description_w8a16.json")):
        d = tmp_path / f"q{i}"
        shutil.copytree(src, d)  # a complete model dir: inspect_model checks its files too
        (d / name).write_text(json.dumps({"model_quant_type": "W8A16"}))
        assert loader.inspect_model(ModelConfig(path=str(d))).quantized


def test_the_fp32_fallback_is_said_once(tiny_model, monkeypatch, capsys):
    logs.setup()
    monkeypatch.setattr(devices, "compute_dtype", lambda dtype, device, weight_bytes: torch.float32)
    loader._say_once.cache_clear()
    info = loader.inspect_model(ModelConfig(path=str(tiny_model("llava"))))
    for _ in range(2):
        assert loader.compute_dtype(info, torch.bfloat16, CPU) == torch.float32
    err = capsys.readouterr().err
    assert err.count(f"llava-batch: this CPU has no bf16 arithmetic (torch emulates it): {info.name} runs in "
                     "float32\n") == 1
