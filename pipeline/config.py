"""Job configuration: TOML in, one validated `JobConfig` out.

Every user mistake becomes a `ConfigError` naming the key, raised before any work is done;
the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the `tomli` backport
    import tomli as tomllib


@dataclass
class ModelConfig:
    path: str = ""
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class InputConfig:
    manifest: list[str] = field(default_factory=list)
    path_column: str | None = "path"
    bytes_column: str | None = None
    kind_column: str | None = None
    prompt_column: str | None = None
    id_column: str | None = None
    media_root: str | None = None
    # Pillow's own default bomb threshold; per job so huge scans can opt in.
    max_image_pixels: int = 89_478_485
    # "parquet", or "webdataset": tar shards (data/webdataset.py), whose media member is the bytes column
    format: str = "parquet"


@dataclass
class GenerationConfig:
    prompt: str = "Describe this image in one sentence."
    # Several prompts per media, name -> prompt: one output row per (row, name), one vision pass for them all.
    prompts: dict[str, str] | None = None
    # KV-cache slots (rows decoded together); "auto" = what fits the device (engine/cache_plan.py).
    max_batch_size: int | str = "auto"
    max_input_length: int = 4096
    max_output_length: int = 128
    video_frames: int = 8
    # Frames a second of video instead of video_frames spread uniformly (still at most video_frames).
    video_fps: float | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # "fast": static KV cache + slot refill (pipeline/engine/fast.py); "hf": transformers generate, the reference.
    engine: str = "fast"
    # Capture the fast engine's decode step as one graph per batch bucket (CUDA / NPU graphs); on the
    # CPU, which has no graphs, steps are only padded to the buckets.
    compile: bool = False
    # Stop a row once its tokens loop (the same 3-gram 4 times; data/quality.py): finish_reason "repetition".
    stop_on_repetition: bool = False
    # Rows of a shard with identical media bytes and prompt are generated once (greedy only; data/dedup.py).
    dedup: bool = False


@dataclass
class OutputConfig:
    dir: str = ""
    rows_per_shard: int = 1000
    chunk_rows: int = 100
    mode: str = "resume"


@dataclass
class RunConfig:
    max_error_rate: float = 1.0
    decode_workers: int = 4
    # Deadline for one row's read + decode: a hung mount or a pathological file errors that row alone.
    decode_timeout_s: float = 120.0
    progress: bool = True
    # Scale-out (pipeline/executors): one worker per device entry; "auto" = every accelerator, else one CPU.
    devices: list[str] = field(default_factory=lambda: ["auto"])
    # Ranks a model is sharded over (fast engine): devices are cut into groups of this many, one worker each.
    tensor_parallel: int = 1
    master_port: int = 20030  # each group's rendezvous, as MindIE's MASTER_PORT; a free one when taken
    executor: str = "local"
    ray_address: str = "auto"
    max_retries: int = 2
    num_nodes: int = 1
    node_rank: int = 0
    steal: bool = False
    lease_timeout_s: float = 60.0
    # Longest a worker on a shard may go without a sign of progress (rows out of its engine, a chunk
    # committed) before it counts as hung and is replaced; above the slowest batch. Loading is not timed.
    worker_timeout_s: float = 600.0


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(JobConfig))

# Settings that change what a caption is; a resume with different values would mix two jobs.
FINGERPRINT_KEYS = {
    "model": ("path", "dtype", "trust_remote_code"),
    "input": ("path_column", "bytes_column", "kind_column", "prompt_column", "id_column", "media_root",
              "max_image_pixels", "format"),
    "generation": ("prompt", "max_input_length", "max_output_length", "video_frames", "do_sample",
                   "temperature", "top_p", "seed", "stop_on_repetition", "video_fps", "prompts"),
    "output": ("rows_per_shard", "chunk_rows"),
}


def load_job(path: str | os.PathLike, overrides: list[str] = ()) -> JobConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"job file {path} is not valid TOML: {e}") from None
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    resolve_paths(cfg, path.resolve().parent)
    validate(cfg)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """`section.key=value`; the value is parsed as TOML, falling back to a bare string."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    raw.setdefault(section, {})[name] = value


def from_dict(raw: dict) -> JobConfig:
    cfg = JobConfig()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                known = ", ".join(hints)
                raise ConfigError(f"unknown key {section}.{key} (known: {known})")
            setattr(target, key, _coerce(f"{section}.{key}", value, hints[key]))
    return cfg


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check `value` against the dataclass annotation; accept a lone string for list[str]."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and value is None and type(None) in args:
        return None
    choices = [a for a in args if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if len(choices) > 1:  # e.g. int | str: the value must be one of them, checked by validate()
        if not isinstance(value, tuple(choices)) or isinstance(value, bool):
            names = " or ".join(c.__name__ for c in choices)
            raise ConfigError(f"{name} must be {names}, got {type(value).__name__} {value!r}")
        return value
    base = choices[0]
    if typing.get_origin(base) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{name} must be a table of name = \"prompt\" strings, got {value!r}")
        return value
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a string or a list of strings, got {value!r}")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        raise ConfigError(f"{name} must be {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def _is_uri(text: str) -> bool:
    return "://" in text


def resolve_paths(cfg: JobConfig, base: Path) -> None:
    """Relative paths in a job file mean relative to the job file's folder."""

    def resolve(p: str) -> str:
        if not p or _is_uri(p):
            return p
        return str((base / os.path.expanduser(p)).resolve())

    cfg.model.path = resolve(cfg.model.path)
    cfg.input.manifest = [resolve(m) for m in cfg.input.manifest]
    if cfg.input.media_root:
        cfg.input.media_root = resolve(cfg.input.media_root)
    cfg.output.dir = resolve(cfg.output.dir)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: JobConfig) -> None:
    m, i, g, o, r = cfg.model, cfg.input, cfg.generation, cfg.output, cfg.run
    _require(i.format in ("parquet", "webdataset"), f"input.format must be parquet|webdataset, got {i.format!r}")
    if i.format == "webdataset":  # the columns data/webdataset.py makes of each sample
        _require(not i.prompt_column and not i.kind_column,
                 "input.prompt_column / kind_column do not apply to input.format = \"webdataset\"")
        i.path_column, i.bytes_column = None, "media"
    _require(bool(m.path), "model.path is required")
    _require(m.dtype in ("auto", "float16", "bfloat16", "float32"),
             f"model.dtype must be auto|float16|bfloat16|float32, got {m.dtype!r}")
    _require(m.device == "auto" or m.device.split(":")[0] in ("cpu", "cuda", "npu"),
             f"model.device must be auto|cpu|cuda[:i]|npu[:i], got {m.device!r}")
    _require(bool(i.manifest), "input.manifest is required")
    _require(bool(i.path_column or i.bytes_column), "input.path_column or input.bytes_column is required")
    _require(i.max_image_pixels > 0, "input.max_image_pixels must be > 0")
    _require(g.max_batch_size == "auto" or isinstance(g.max_batch_size, int) and g.max_batch_size >= 1,
             f"generation.max_batch_size must be \"auto\" or >= 1, got {g.max_batch_size!r}")
    _require(g.max_input_length >= 1, f"generation.max_input_length must be >= 1, got {g.max_input_length}")
    _require(g.max_output_length >= 1, f"generation.max_output_length must be >= 1, got {g.max_output_length}")
    _require(g.video_frames >= 1, f"generation.video_frames must be >= 1, got {g.video_frames}")
    _require(g.video_fps is None or 0 < g.video_fps < float("inf"),
             f"generation.video_fps must be > 0 (frames a second), got {g.video_fps}")
    _require(g.temperature > 0, f"generation.temperature must be > 0, got {g.temperature}")
    _require(0 < g.top_p <= 1, f"generation.top_p must be in (0, 1], got {g.top_p}")
    _require(g.engine in ("fast", "hf"), f"generation.engine must be fast|hf, got {g.engine!r}")
    _require(not (g.dedup and g.do_sample),
             "generation.dedup needs greedy decoding: sampled rows are seeded by their row, so duplicates differ")
    _require(bool(g.prompt.strip()) or bool(i.prompt_column), "generation.prompt must not be empty")
    _validate_prompts(g, i)
    _require(bool(o.dir), "output.dir is required")
    _require(o.rows_per_shard >= 1, f"output.rows_per_shard must be >= 1, got {o.rows_per_shard}")
    _require(1 <= o.chunk_rows <= o.rows_per_shard,
             f"output.chunk_rows must be in [1, rows_per_shard={o.rows_per_shard}], got {o.chunk_rows}")
    _require(o.mode in ("resume", "overwrite"), f"output.mode must be resume|overwrite, got {o.mode!r}")
    _require(0 <= r.max_error_rate <= 1, f"run.max_error_rate must be in [0, 1], got {r.max_error_rate}")
    _require(r.decode_workers >= 1, f"run.decode_workers must be >= 1, got {r.decode_workers}")
    _require(0 < r.decode_timeout_s < float("inf"),
             f"run.decode_timeout_s must be > 0 (seconds), got {r.decode_timeout_s}")
    _validate_scaleout(r, o)


def _validate_prompts(g: GenerationConfig, i: InputConfig) -> None:
    if g.prompts is None:
        return
    _require(bool(g.prompts), "generation.prompts must name at least one prompt")
    _require(not i.prompt_column, "generation.prompts and input.prompt_column are two sources of prompts: "
             "give one (a list-valued prompt column gives several prompts per row)")
    for name, text in g.prompts.items():
        _require(bool(name.strip()), "generation.prompts: a prompt name must not be empty")
        _require(bool(text.strip()), f"generation.prompts.{name} must not be empty")


def _validate_scaleout(r: RunConfig, o: OutputConfig) -> None:
    _require(bool(r.devices), "run.devices must be \"auto\" or a non-empty list of devices")
    _require(r.devices == ["auto"] or all(d.split(":")[0] in ("cpu", "cuda", "npu") for d in r.devices),
             f"run.devices must be \"auto\" or a list of cpu|cuda[:i]|npu[:i], got {r.devices!r}")
    _require(r.executor in ("local", "ray"), f"run.executor must be local|ray, got {r.executor!r}")
    _require(r.tensor_parallel in (1, 2, 4, 8), f"run.tensor_parallel must be 1, 2, 4 or 8, got {r.tensor_parallel}")
    _require(0 < r.master_port < 65536, f"run.master_port must be a TCP port, got {r.master_port}")
    _require(r.max_retries >= 0, f"run.max_retries must be >= 0, got {r.max_retries}")
    _require(r.num_nodes >= 1, f"run.num_nodes must be >= 1, got {r.num_nodes}")
    _require(0 <= r.node_rank < r.num_nodes, f"run.node_rank must be in [0, {r.num_nodes}), got {r.node_rank}")
    _require(r.lease_timeout_s > 0, f"run.lease_timeout_s must be > 0, got {r.lease_timeout_s}")
    _require(0 < r.worker_timeout_s < float("inf"),
             f"run.worker_timeout_s must be > 0 (seconds), got {r.worker_timeout_s}")
    # Each node would wipe the others' chunks.
    _require(r.num_nodes == 1 or o.mode == "resume", "output.mode = \"overwrite\" needs run.num_nodes = 1")


# Keys added to FINGERPRINT_KEYS after jobs were written without them: at their default they are
# left out of the view, so an older job's fingerprint (and a resume into its dir) stays the same.
ADDED_DEFAULTS = {("generation", "stop_on_repetition"): False, ("generation", "video_fps"): None,
                  ("generation", "prompts"): None, ("input", "format"): "parquet"}


def fingerprint_view(config: dict) -> dict:
    """The part of a resolved config that must match for a resume to be the same job."""
    view = {}
    for section, keys in FINGERPRINT_KEYS.items():
        values = config.get(section, {})
        view[section] = {k: values.get(k, ADDED_DEFAULTS.get((section, k))) for k in keys
                         if (section, k) not in ADDED_DEFAULTS or values.get(k, ADDED_DEFAULTS[(section, k)])
                         != ADDED_DEFAULTS[(section, k)]}
    return view
