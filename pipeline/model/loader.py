"""Load a LLaVA-family model and its processor from a local dir; build prompts.

Everything is local: `local_files_only`, safetensors only, no remote code unless the job says so.
The dir is checked first by the light `pipeline.model.inspect` (re-exported here for the callers
that load right after).
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

import quant
from pipeline import devices, families
from pipeline.logs import log
from pipeline.model.inspect import ModelInfo, describe, inspect_model  # noqa: F401 - re-exported

MODEL_CLASSES = {family: families.model_class(name) for family, name in families.CLASS_NAMES.items()}

# The conversation formats the llava-hf model cards give, for model dirs without a chat template.
_VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_FORMATS = {
    "llava-1.5": "USER: {media}\n{text} ASSISTANT:",
    "mistral": "[INST] {media}\n{text} [/INST]",
    "vicuna": _VICUNA_SYSTEM + " USER: {media}\n{text} ASSISTANT:",
    "chatml": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{media}\n{text}"
               "<|im_end|><|im_start|>assistant\n"),
}


def model_config(info: ModelInfo):
    """The model's config with transformers' defaults filled in (llava-hf configs omit many)."""
    return AutoConfig.from_pretrained(info.path, local_files_only=True)


def load_processor(info: ModelInfo, trust_remote_code: bool = False):
    processor = AutoProcessor.from_pretrained(info.path, local_files_only=True, trust_remote_code=trust_remote_code)
    # Decoder-only batches must be left padded so every row's last prompt token lines up.
    processor.tokenizer.padding_side = "left"
    _use_pil_images(processor, info)
    return processor


def _use_pil_images(processor, info: ModelInfo) -> None:
    """Images go through the image processor's PIL backend, not the torchvision one transformers 5
    picks by default. Both follow the checkpoint's preprocessor config; PIL is transformers' reference
    implementation (what llava-hf checkpoints were preprocessed with under transformers 4), and it runs
    no torch ops. Torch ops on the fast engine's feeder thread start a second OpenMP team, and libgomp
    with more threads than cores cuts spin-waiting short for all of them, which slows the decode
    steps (benchmarks/workloads.py w1 shows it). Video processors have no PIL backend and stay as they are.
    """
    if getattr(processor, "image_processor", None) is None:
        return
    try:
        processor.image_processor = AutoImageProcessor.from_pretrained(info.path, local_files_only=True,
                                                                       backend="pil")
    except (ImportError, ValueError, OSError):
        pass  # no PIL backend for this processor: keep the default one


def load_model(info: ModelInfo, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    cls = MODEL_CLASSES[info.family]
    if info.quantized:
        model = quant.load_quantized_model(cls, info.path, device=device, dtype=dtype)
    else:
        model = cls.from_pretrained(
            info.path, dtype=dtype, device_map={"": str(device)}, use_safetensors=True,
            local_files_only=True, trust_remote_code=trust_remote_code,
        )
    return model.eval()


def compute_dtype(info: ModelInfo, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """devices.compute_dtype for this model's float weights, said once when it differs."""
    if info.quantized:  # W8A16 dirs keep the dtype their int8 kernels take
        return dtype
    chosen = devices.compute_dtype(dtype, device, weight_bytes(info))
    if chosen != dtype:
        _say_once(f"this CPU has no bf16 arithmetic (torch emulates it): {info.name} runs in float32")
    return chosen


def weight_bytes(info: ModelInfo) -> int:
    """The weights' size on disk: what loading them takes, at the dtype they were saved in."""
    return sum(f.stat().st_size for f in info.path.glob("*.safetensors"))


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


def conversation_format(info: ModelInfo) -> str:
    if info.family != "llava_next":
        return _FORMATS["llava-1.5"]
    text = info.config.get("text_config", {})
    if text.get("model_type") == "mistral":
        return _FORMATS["mistral"]
    if text.get("vocab_size") == 64000:  # Yi-34B behind llava-v1.6-34b speaks ChatML
        return _FORMATS["chatml"]
    return _FORMATS["vicuna"]


def build_prompt(processor, info: ModelInfo, text: str, kind: str) -> str:
    """The exact text given to the processor: its chat template when it has one."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    media = processor.video_token if kind == "video" else processor.image_token
    return conversation_format(info).format(media=media, text=text)
