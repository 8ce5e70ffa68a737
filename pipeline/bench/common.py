"""What both benchmarks (perf.py, captions.py) share: loading the model they time, feeding its
transformers baseline, and measuring the machine they time it on."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from pipeline import devices
from pipeline.config import ModelConfig
from pipeline.model import loader


def load(model_dir: str, device_spec: str, dtype_spec: str):
    """(info, processor, model, device) for a model dir, with device and dtype as the CLI spells them."""
    info = loader.inspect_model(ModelConfig(path=model_dir))
    device = devices.resolve_device(device_spec)
    model = loader.load_model(info, device, devices.resolve_dtype(dtype_spec, device))
    return info, loader.load_processor(info), model, device


def hf_inputs(processor, model, device, prompts: list[str], images: list):
    """What the transformers baselines hand `generate`: one padded batch on the device, pixels in
    the model's dtype."""
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def machine_peaks(size: int = 2048, copy_mb: int = 512) -> dict:
    """What this CPU is, and its measured matmul GFLOP/s (bf16, fp32) and copy bandwidth (GB/s, read +
    write): figures from one machine kind say little about another."""
    src = torch.empty(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    copy = min(_timed(lambda: dst.copy_(src)) for _ in range(10))
    return {"cpu": cpu_kind(), "bf16_matmul_gflop_per_s": _matmul_gflop_per_s(torch.bfloat16, size),
            "fp32_matmul_gflop_per_s": _matmul_gflop_per_s(torch.float32, size),
            "copy_gb_per_s": round(2 * src.numel() * 4 / copy / 1e9, 2)}


def _matmul_gflop_per_s(dtype: torch.dtype, size: int) -> float:
    """Square matmuls up to `size`, smaller where one takes long: a CPU without bf16 arithmetic
    emulates it far slower than fp32 runs."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(3 if n < size else 10))  # min: least disturbed
        if n >= size or best > 0.05:
            return round(2 * n**3 / best / 1e9, 1)
        n *= 2


def cpu_kind() -> dict:
    """The CPU and what the engine's CPU path decided on it (pipeline/kernels/cpu.py, packed_linear.py)."""
    from pipeline.kernels import cpu as cpu_kernels
    from pipeline.model import packed_linear

    model = next((line.partition(":")[2].strip() for line in _cpuinfo() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return {"model": model, "machine": platform.machine(), "torch_isa": torch.backends.cpu.get_cpu_capability(),
            "onednn_packs_bf16": packed_linear.onednn_packs_bf16(), "cpu_kernels": cpu_kernels.selected()}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
