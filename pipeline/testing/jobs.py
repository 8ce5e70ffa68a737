"""Job files and manifests written for tests, demos and benchmarks (real TOML, real Parquet)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; keys quoted, so any name is one
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
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
