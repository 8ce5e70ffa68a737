"""Shared fixtures: tiny models are built once per session; media are written per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub; make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The test models are tiny: thread start-up costs more than their matmuls on a 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, **kw) -> model dir, built once per (family, kw) for the whole session."""
    from pipeline.testing.tiny_model import build_tiny_model

    cache: dict[tuple, Path] = {}

    def get(family: str, **kw) -> Path:
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([family] + [f"{k}{v}" for k, v in sorted(kw.items())])
            cache[key] = build_tiny_model(tmp_path_factory.mktemp("models") / name, family, **kw)
        return cache[key]

    return get
