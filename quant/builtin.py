"""Our own W8A16 converter: same math and format as msModelSlim's data-free W8A16, streamed.

Peak memory is one row block (BLOCK_BYTES of source data plus its fp32 copy), independent of
model size: the output header is planned from the source headers alone, then every tensor is
copied or quantized block by block with positioned reads and appending writes (see st_io).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.families import meta_model
from quant import families, layout, names, st_io
from quant.errors import QuantError
from quant.qmath import quantize_rows

BLOCK_BYTES = 16 << 20  # source bytes per row block (peak ~ 3x this for bf16 sources)
DEFAULT_SHARD_BYTES = 5 << 30  # output shard size, like Hugging Face's default


@dataclass
class _Out:
    """One output tensor: its name, dtype, shape, and what produces its bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str  # "copy" | "qweight" | "scale" | "offset"
    src: st_io.TensorInfo
    qtype: str  # description entry: "W8A16" | "FLOAT"


def _plan(src_dir: Path, scheme: str) -> list[_Out]:
    infos: dict[str, st_io.TensorInfo] = {}
    for path in layout.weight_files(src_dir):
        infos.update(st_io.read_header(path))
    quantized = {n + ".weight" for n in families.quantizable_linears(meta_model(src_dir))}
    by_hf = {names.to_hf(k): v for k, v in infos.items()}
    missing = sorted(quantized - by_hf.keys())
    if missing:
        raise QuantError(f"{src_dir}: checkpoint lacks language-model weights, e.g. {missing[0]}")
    plan = []
    for hf_name, info in by_hf.items():
        out = names.to_scheme(hf_name, scheme)
        if hf_name not in quantized:
            plan.append(_Out(out, info.dtype, info.shape, "copy", info, "FLOAT"))
            continue
        if not info.dtype.is_floating_point or len(info.shape) != 2:
            raise QuantError(f"{src_dir}: {info.name} is not a float matrix ({info.dtype}, {info.shape})")
        base, n = out[: -len(".weight")], info.shape[0]
        plan += [_Out(out, torch.int8, info.shape, "qweight", info, "W8A16"),
                 _Out(base + ".weight_scale", info.dtype, (n, 1), "scale", info, "W8A16"),
                 _Out(base + ".weight_offset", info.dtype, (n, 1), "offset", info, "W8A16")]
    return plan


def _shards(plan: list[_Out], max_bytes: int) -> list[list[_Out]]:
    """Split the plan into shards of <= max_bytes, keeping a linear's three tensors together."""
    shards, cur, size = [], [], 0
    for i, out in enumerate(plan):
        nbytes = st_io.nbytes(out.dtype, out.shape)
        starts_group = out.kind in ("copy", "qweight")
        if starts_group and cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(out)
        size += nbytes
        if i == len(plan) - 1:
            shards.append(cur)
    return shards


def _row_blocks(info: st_io.TensorInfo):
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, info.nbytes // max(rows, 1))
    step = max(1, BLOCK_BYTES // per_row)
    for start in range(0, rows, step):
        yield st_io.read_rows(info, start, min(rows, start + step))


def _write_shard(path: Path, shard: list[_Out]) -> None:
    writer = st_io.StreamWriter(path, [(o.name, o.dtype, o.shape) for o in shard], {"format": "pt"})
    try:
        scales: list[torch.Tensor] = []
        for out in shard:
            if out.kind == "copy":
                for block in _row_blocks(out.src):
                    writer.write(out.name, block)
            elif out.kind == "qweight":
                scales = []
                for block in _row_blocks(out.src):
                    q, scale = quantize_rows(block, out.src.dtype)
                    writer.write(out.name, q)
                    scales.append(scale)
            elif out.kind == "scale":
                writer.write(out.name, torch.cat(scales).to(out.dtype))
            else:  # symmetric: the offset is all zeros, kept because MindIE / vllm-ascend read it
                writer.write(out.name, torch.zeros(out.shape, dtype=out.dtype))
    finally:
        writer.close()


def convert(src_dir: Path, dst_dir: Path, *, names_scheme: str = "hf",
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write the W8A16 weights, their index (when sharded) and the description into dst_dir."""
    plan = _plan(src_dir, names_scheme)
    shards = _shards(plan, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = layout.shard_name(i, len(shards))
        _write_shard(dst_dir / fname, shard)
        for out in shard:
            weight_map[out.name] = fname
            total += st_io.nbytes(out.dtype, out.shape)
    if len(shards) > 1:
        layout.write_index(dst_dir, weight_map, total)
    layout.write_description(dst_dir, {o.name: o.qtype for o in plan})
