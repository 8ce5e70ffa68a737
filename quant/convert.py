"""`llava-batch quantize`: checks, backend choice, and assembling a complete W8A16 model dir.

The weights are written into a hidden temp dir beside DST and moved into place only once
complete, so a crash or a refused model never leaves a half-written DST behind.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.logs import log
from quant import builtin, families, layout, msmodelslim_backend, names
from quant.errors import QuantError

BACKENDS = ("auto", "msmodelslim", "builtin")
# Weight files are replaced by the quantized ones; everything else (config, tokenizer,
# processor, chat template, generation config) is copied so DST is a complete model dir.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".safetensors.index.json",
                    ".bin.index.json")


def _check(src: Path, dst: Path, backend: str, names_scheme: str, overwrite: bool) -> None:
    if backend not in BACKENDS:
        raise QuantError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if names_scheme not in names.SCHEMES:
        raise QuantError(f"unknown --names {names_scheme!r} (expected one of {', '.join(names.SCHEMES)})")
    if not src.is_dir():
        raise QuantError(f"{src}: not a directory")
    if layout.is_quantized(src):
        raise QuantError(f"{src}: already quantized ({layout.description_path(src).name} present)")
    families.model_class_name(families.read_config(src), src)  # refuses unknown families
    layout.weight_files(src)  # refuses dirs without safetensors
    if dst == src:
        raise QuantError(f"{dst}: destination is the source dir")
    if src in dst.parents:
        raise QuantError(f"{dst}: destination lies inside the source dir")
    if dst.exists() and not dst.is_dir():
        raise QuantError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise QuantError(f"{dst}: not empty (pass --overwrite to replace it)")


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "msmodelslim" if msmodelslim_backend.available() else "builtin"
    return backend


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in sorted(src.iterdir()):
        if path.name.startswith(".") or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if path.is_dir():
            shutil.copytree(path, dst / path.name)
        else:
            shutil.copy2(path, dst / path.name)


def quantize(src_dir, dst_dir, *, backend: str = "auto", names: str = "hf", overwrite: bool = False,
             max_shard_bytes: int = builtin.DEFAULT_SHARD_BYTES) -> Path:
    """Convert a llava-hf model dir into a W8A16 (msModelSlim ascendV1) model dir; returns DST."""
    src, dst = Path(src_dir).resolve(), Path(dst_dir).resolve()
    _check(src, dst, backend, names, overwrite)
    chosen = resolve_backend(backend)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        if chosen == "msmodelslim":
            msmodelslim_backend.convert(src, tmp, names_scheme=names)
        else:
            builtin.convert(src, tmp, names_scheme=names, max_shard_bytes=max_shard_bytes)
        _copy_side_files(src, tmp)
        layout.write_provenance(tmp, backend=chosen, names=names, source=str(src),
                                quantized_by="llava-batch")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote W8A16 model (%s, %s names) to %s", chosen, names, dst)
    return dst
