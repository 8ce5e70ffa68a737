"""What the CPU path decides from the machine it finds: bf16 runs as fp32 where the CPU has no bf16
arithmetic and the fp32 weights fit; everything else keeps the job's dtype."""

from __future__ import annotations

import torch

from pipeline import devices

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
GIB = 2**30


def test_bf16_stays_bf16_where_the_cpu_has_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.compute_dtype(torch.bfloat16, CPU, GIB) == torch.bfloat16


def test_bf16_runs_in_fp32_where_the_cpu_emulates_it_and_fp32_fits(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 10 * GIB)
    assert devices.compute_dtype(torch.bfloat16, CPU, GIB) == torch.float32
    # a 14 GB bf16 model would need 28 GB in fp32: it stays bf16
    assert devices.compute_dtype(torch.bfloat16, CPU, 14 * GIB) == torch.bfloat16
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: None)
    assert devices.compute_dtype(torch.bfloat16, CPU, GIB) == torch.bfloat16


def test_other_dtypes_and_devices_keep_the_jobs_dtype(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 100 * GIB)
    assert devices.compute_dtype(torch.float32, CPU, GIB) == torch.float32
    assert devices.compute_dtype(torch.float16, CPU, GIB) == torch.float16
    assert devices.compute_dtype(torch.bfloat16, CUDA, GIB) == torch.bfloat16


def test_the_machine_answer_agrees_with_onednn():
    from pipeline.model import packed_linear

    # Where oneDNN packs bf16 bit-identically the CPU has bf16 arithmetic, and the reverse.
    assert devices.cpu_has_bf16() == packed_linear.onednn_packs_bf16()
