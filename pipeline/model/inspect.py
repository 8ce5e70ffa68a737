"""Check a model dir before any work, reading only small files: json and file sizes, no torch.

A job's checks (config, manifest, model dir, output dir) all run before torch and transformers are
imported, so a bad job costs well under a second. What is checked here is what would otherwise fail
with a traceback only once the weights start loading: the family, the tokenizer and processor files,
and every safetensors file's header against its size (a truncated copy is the common case).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.families import CLASS_NAMES
from quant import layout
from quant.errors import QuantError

# The safetensors library refuses headers above this size; a larger length means a corrupt file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Fast tokenizer, sentencepiece model, BPE vocabulary (+ merges.txt): one of them is the tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelInfo:
    path: Path
    family: str
    config: dict
    quantized: bool

    @property
    def supports_video(self) -> bool:
        return self.family == "llava_next_video"

    @property
    def name(self) -> str:
        return self.path.name


def inspect_model(cfg: ModelConfig) -> ModelInfo:
    """The model dir's family and quantization; ConfigError (one line naming the file) if it cannot run:
    not local, no config.json, a family we do not run, tokenizer or processor files missing, weights
    that are not safetensors, or a safetensors file whose header and size disagree."""
    if "://" in cfg.path:
        raise ConfigError(f"model.path must be a local directory, got {cfg.path!r}")
    path = Path(cfg.path)
    config = _read_json(path / "config.json", f"no config.json in {path}")
    _check_processor_files(path, config)
    quantized = layout.is_quantized(path)
    for weights in _weight_files(path):
        check_safetensors(weights)
    return ModelInfo(path, _family(config), config, quantized)


def describe(info: ModelInfo) -> str:
    """The `model` output column: the model name, plus its quantization when it has one."""
    if not info.quantized:
        return info.name
    return f"{info.name} ({layout.describe(info.path)})"


def _family(config: dict) -> str:
    family = config.get("model_type")
    if family not in CLASS_NAMES:
        raise ConfigError(f"model.path: model_type {family!r} is not a LLaVA family we support "
                          f"({', '.join(CLASS_NAMES)})")
    return family


def _read_json(path: Path, missing: str) -> dict:
    if not path.is_file():  # also refuses a FIFO or device named like the file, which would block a read
        raise ConfigError(f"model.path: {missing}")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.path: {path} is unreadable or not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"model.path: {path} is not a JSON object")
    return value


def _check_processor_files(path: Path, config: dict) -> None:
    """The files AutoProcessor reads. transformers 5 nests the image and video processors in
    processor_config.json; dirs saved by transformers 4 (the llava-hf checkpoints) have
    preprocessor_config.json and, for video, video_preprocessor_config.json."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(f"model.path: no tokenizer in {path} (none of {', '.join(_TOKENIZER_FILES)})")
    if not (path / "tokenizer_config.json").is_file():
        raise ConfigError(f"model.path: no tokenizer_config.json in {path}")
    nested = {}
    if (path / "processor_config.json").exists():
        nested = _read_json(path / "processor_config.json", f"processor_config.json in {path} is not a file")
    if "image_processor" not in nested and not (path / "preprocessor_config.json").is_file():
        raise ConfigError(f"model.path: no preprocessor_config.json in {path} (the image processor)")
    video_files = ("video_preprocessor_config.json", "preprocessor_config.json")
    if config.get("model_type") == "llava_next_video" and "video_processor" not in nested \
            and not any((path / name).is_file() for name in video_files):
        raise ConfigError(f"model.path: no video_preprocessor_config.json in {path} (the video processor)")


def _weight_files(path: Path) -> list[Path]:
    """Every safetensors file the dir's index names, else every *.safetensors (quantized or not)."""
    try:
        files = layout.weight_files(path)
    except QuantError as e:
        raise ConfigError(f"model.path: {e}") from None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:  # an index that is not JSON
        raise ConfigError(f"model.path: unreadable weight index in {path} ({e})") from None
    for file in files:
        if not file.is_file():
            raise ConfigError(f"model.path: weight file {file} is missing or not a regular file")
    return files


def check_safetensors(path: Path) -> None:
    """The file is exactly as long as its header says: 8-byte header length + JSON header + the
    end of the last tensor's data. Reads the header only, never the tensors."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 2 <= n <= min(size - 8, _MAX_HEADER_BYTES):
                raise ConfigError(f"model.path: {path} is not a safetensors file, or is truncated "
                                  f"({size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ConfigError(f"model.path: cannot read {path}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"model.path: {path} has a corrupt safetensors header") from None
    expected = 8 + n + _data_end(path, header)
    if expected != size:
        raise ConfigError(f"model.path: {path} is {size} bytes but its header says {expected}: "
                          f"{'truncated' if size < expected else 'corrupt'} (copy it again)")


def _data_end(path: Path, header) -> int:
    """Where the last tensor's bytes end, from the header's data_offsets."""
    if not isinstance(header, dict):
        raise ConfigError(f"model.path: {path} has a corrupt safetensors header")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ConfigError(f"model.path: {path} has a corrupt safetensors header (tensor {name!r})")
        end = max(end, offsets[1])
    return end
