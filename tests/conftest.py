"""Shared fixtures: tiny models are built once per session; media are written per test."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
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
    from pipeline.tiny_model import build_tiny_model

    cache: dict[tuple, Path] = {}

    def get(family: str, **kw) -> Path:
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([family] + [f"{k}{v}" for k, v in sorted(kw.items())])
            cache[key] = build_tiny_model(tmp_path_factory.mktemp("models") / name, family, **kw)
        return cache[key]

    return get


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_job(path: Path, sections: dict) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_manifest(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def job_sections(model: Path, manifest: Path, out: Path, **overrides) -> dict:
    """A small fp32 CPU job; `overrides` are {section: {key: value}} merged in."""
    sections = {
        "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "input": {"manifest": str(manifest)},
        "generation": {"max_batch_size": 4, "max_output_length": 24, "video_frames": 4},
        "output": {"dir": str(out), "rows_per_shard": 8, "chunk_rows": 4},
        "run": {"progress": False, "decode_workers": 2},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


def read_tensors(model_dir: Path) -> dict:
    """Every tensor of every safetensors file in a model dir, by name."""
    from safetensors import safe_open

    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
