"""Streaming safetensors I/O: read one tensor (or a row block of it) and write files header-first.

Why not `safetensors.safe_open` / `save_file`: safe_open memory-maps whole shards, so every page a
conversion touches stays in the process RSS until the file is closed, and `save_file` needs every
tensor of a shard in memory at once. A 34B model must convert on a host with less RAM than the
model, so both sides go through plain positioned reads/writes of one row block at a time.
Format (https://github.com/huggingface/safetensors): u64 little-endian header length, JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then raw bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without opening any other tensor."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * _itemsize(dtype)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one .safetensors file, in file order."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    infos = {}
    for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {meta['dtype']}")
        infos[name] = TensorInfo(path, name, _DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                 8 + n + meta["data_offsets"][0])
    return infos


def read_rows(info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of a tensor (the whole tensor by default) as a fresh CPU tensor."""
    shape = info.shape
    if not shape:
        start, stop, row_shape = 0, 1, ()
    else:
        stop = shape[0] if stop is None else stop
        row_shape = shape[1:]
    row_bytes = math.prod(row_shape) * _itemsize(info.dtype)
    buf = bytearray((stop - start) * row_bytes)
    with open(info.path, "rb") as f:
        f.seek(info.begin + start * row_bytes)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{info.path.name}: truncated data for {info.name}")
    flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    out = flat.view(info.dtype)
    return out.reshape(shape) if not shape else out.reshape((stop - start, *row_shape))


class StreamWriter:
    """Writes one safetensors file whose tensor list (names, dtypes, shapes) is known up front.

    Tensors must then be written in the declared order, each in one or more row blocks, so the
    writer never holds more than the block it is given.
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order = []
        for name, dtype, shape in specs:
            size = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, offset + size))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # readers expect the data section 8-byte aligned
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close(); lifetime spans many calls
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._data_start = 8 + len(blob)
        self._next = 0  # index into _order of the tensor being written
        self.total_bytes = offset

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append a row block of tensor `name` (which must be the current or the next one)."""
        expected, end = self._order[self._next]
        # current tensor complete (or empty and never written): move on to the one named
        while name != expected and self._f.tell() - self._data_start == end and self._next + 1 < len(self._order):
            self._next += 1
            expected, end = self._order[self._next]
        if name != expected:
            raise ValueError(f"write order: got {name}, expected {expected}")
        data = block.detach().contiguous().cpu()
        if data.numel():
            self._f.write(data.reshape(-1).view(torch.uint8).numpy())
        if self._f.tell() - self._data_start > end:
            raise ValueError(f"{name}: more bytes written than declared")

    def close(self) -> None:
        written = self._f.tell() - self._data_start
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if written != self.total_bytes:
            raise ValueError(f"incomplete safetensors file: {written} of {self.total_bytes} bytes written")
