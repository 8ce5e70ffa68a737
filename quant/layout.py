"""msModelSlim's ascendV1 W8A16 layout on disk: file names, the description, provenance.

A quantized dir holds quant_model_weight_w8a16.safetensors (or -0000i-of-0000n shards plus
quant_model_weight_w8a16.safetensors.index.json) and a description mapping every tensor name to
"W8A16" or "FLOAT" plus "model_quant_type". msModelSlim's ascendV1 saver names the description
quant_model_description.json, its older "safe_tensor" saver quant_model_description_w8a16.json:
both are read. Our converter adds llava_batch_quant.json (backend, name scheme) for `describe`;
dirs written by msModelSlim itself simply lack it.
"""

from __future__ import annotations

import json
from pathlib import Path

from quant.errors import QuantError

DESCRIPTION_NAMES = ("quant_model_description.json", "quant_model_description_w8a16.json")
WEIGHT_STEM = "quant_model_weight_w8a16"
PROVENANCE_NAME = "llava_batch_quant.json"
SUPPORTED_TYPES = ("W8A16",)


def description_path(model_dir) -> Path | None:
    for name in DESCRIPTION_NAMES:
        path = Path(model_dir) / name
        if path.is_file():
            return path
    return None


def is_quantized(model_dir) -> bool:
    """True when the dir carries an msModelSlim-style quantization description (any type)."""
    return description_path(model_dir) is not None


def read_description(model_dir) -> dict:
    """The description dict; QuantError if missing, unreadable or not a quant type we run."""
    path = description_path(model_dir)
    if path is None:
        raise QuantError(f"{model_dir}: no {DESCRIPTION_NAMES[0]} (not a quantized model dir)")
    try:
        desc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QuantError(f"{path}: unreadable quantization description ({e})") from e
    qtype = desc.get("model_quant_type") if isinstance(desc, dict) else None
    if qtype not in SUPPORTED_TYPES:
        raise QuantError(f"{path}: model_quant_type {qtype!r} is not supported (only W8A16)")
    return desc


def weight_files(model_dir) -> list[Path]:
    """The safetensors files of a model dir, quantized or not, via the index when there is one."""
    model_dir = Path(model_dir)
    for index in sorted(model_dir.glob("*.safetensors.index.json")):
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QuantError(f"{model_dir}: no .safetensors weights (only safetensors models are supported)")
    return files


def shard_name(i: int, n: int) -> str:
    """Output weight file i (0-based) of n; one file keeps the plain name msModelSlim uses."""
    return f"{WEIGHT_STEM}.safetensors" if n == 1 else f"{WEIGHT_STEM}-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(dst: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (dst / f"{WEIGHT_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_description(dst: Path, types: dict[str, str]) -> None:
    desc = {"model_quant_type": "W8A16", "version": "1.0.0", **types}
    (dst / DESCRIPTION_NAMES[0]).write_text(json.dumps(desc, indent=2) + "\n")


def write_provenance(dst: Path, **fields) -> None:
    (dst / PROVENANCE_NAME).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def read_provenance(model_dir) -> dict:
    path = Path(model_dir) / PROVENANCE_NAME
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def describe(model_dir, group_size: int | None = None) -> str:
    """Human text for the quantization of a dir, e.g. "W8A16 per-channel (builtin)".

    `group_size` comes from the loader (which sees the scale shapes); without it the description's
    own group_size key (msModelSlim writes it for per-group) is used.
    """
    desc = read_description(model_dir)
    group = group_size if group_size is not None else int(desc.get("group_size") or 0)
    gran = f"per-group g{group}" if group else "per-channel"
    backend = read_provenance(model_dir).get("backend", "msmodelslim")
    backend = {"msmodelslim": "msModelSlim"}.get(backend, backend)
    return f"W8A16 {gran} ({backend})"

