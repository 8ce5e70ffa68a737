"""A job's context on one device (or tensor parallel group): model, processor and engine loaded
once, the cache planned before and after the weights load, and what a worker needs to make a
row's prompt."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from pipeline import devices
from pipeline.config import JobConfig
from pipeline.data.manifest import Manifest
from pipeline.data.output import OutputDir
from pipeline.data.sources import MediaSource
from pipeline.engine import make_engine
from pipeline.engine.base import Engine
from pipeline.engine.cache_plan import CachePlan, longest_job_prompt, plan_cache, slot_length
from pipeline.errors import ConfigError
from pipeline.logs import log
from pipeline.model import loader
from pipeline.model.inspect import ModelInfo
from pipeline.model.loader import build_prompt


@dataclass
class JobContext:
    cfg: JobConfig
    manifest: Manifest
    out: OutputDir
    info: ModelInfo
    processor: object
    engine: Engine
    model_name: str
    plan: CachePlan
    source: MediaSource = field(init=False)

    def __post_init__(self):
        self.source = MediaSource(self.cfg.input)
        self._prompts: dict[tuple[str, str], str] = {}
        self._specials = _special_tokens(self.processor)

    def special_token_in(self, text: str) -> str | None:
        """The first of the tokenizer's special tokens in `text`: the tokenizer would read it as the
        real control token (an end of turn, a BOS, an image placeholder) even inside the chat template."""
        found = self._specials.search(text) if self._specials else None
        return found.group(0) if found else None

    def prompt_for(self, text: str, kind: str) -> str:
        key = (text, kind)
        if key not in self._prompts:
            self._prompts[key] = build_prompt(self.processor, self.info, text, kind)
        return self._prompts[key]


def _special_tokens(processor) -> re.Pattern | None:
    tok = getattr(processor, "tokenizer", processor)
    tokens = set(getattr(tok, "all_special_tokens", None) or ())
    tokens |= {t.content for t in (getattr(tok, "added_tokens_decoder", None) or {}).values() if t.special}
    tokens.discard("")
    # Longest first, so "<|im_end|>" is reported rather than a shorter token inside it.
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None


def open_context(cfg: JobConfig, manifest: Manifest, out: OutputDir, info: loader.ModelInfo, model_name: str,
                 device_spec: str) -> JobContext:
    """Load the model once on `device_spec` (or a tensor parallel group, "dev+dev+...", of which this
    process is rank 0): in this process, a worker process or a Ray actor. The context's config has
    the plan's slots as generation.max_batch_size."""
    group = device_spec.split("+")
    device = devices.resolve_device(group[0])
    dtype = loader.compute_dtype(info, devices.resolve_dtype(cfg.model.dtype, device), device)
    processor = loader.load_processor(info, cfg.model.trust_remote_code)
    prompt = job_prompt_length(cfg, manifest, info, processor)
    kv_dtype = devices.kv_cache_dtype(device, dtype)
    world = len(group)
    plan_before_loading(cfg, info, prompt, device, dtype, world)
    model, leader = _load(cfg, info, group, device, dtype)
    auto = cfg.generation.max_batch_size == "auto"
    plan = plan_cache(model.config, cfg.generation, prompt, device, kv_dtype,
                      devices.free_memory_bytes(device) if auto else None, world=world)
    log.info(plan.line(device))
    cfg = replace(cfg, generation=replace(cfg.generation, max_batch_size=plan.slots))
    engine = make_engine(model, processor, cfg.generation, device, plan, tp=leader)
    return JobContext(cfg, manifest, out, info, processor, engine, model_name, plan)


def plan_before_loading(cfg: JobConfig, info: ModelInfo, prompt: int, device, dtype, world: int) -> CachePlan:
    """The cache plan against what the weights will leave on `device` (a rank's share of them):
    a cache that cannot fit is a configuration error before they load, not an out-of-memory error
    after minutes of loading."""
    free = devices.free_memory_bytes(device)
    after_weights = None if free is None else free - loader.weight_bytes(info) // world
    return plan_cache(loader.model_config(info), cfg.generation, prompt, device,
                      devices.kv_cache_dtype(device, dtype), after_weights, world=world)


def _load(cfg: JobConfig, info: ModelInfo, group: list[str], device, dtype):
    """(the model, the tensor parallel Leader or None): the whole model, or rank 0's shard with the
    group's other ranks started beside it."""
    if len(group) == 1:
        return loader.load_model(info, device, dtype, cfg.model.trust_remote_code), None
    from pipeline.engine import tp_group
    from pipeline.engine.tp_steps import Leader
    from pipeline.model.tensor_parallel import load_shard

    place, _ = tp_group.start(group, str(info.path), dtype, cfg.run.master_port, cfg.run.worker_timeout_s)
    model = load_shard(loader.MODEL_CLASSES[info.family], info, device, dtype, place)
    return model, Leader(device, dtype, model.config.text_config.hidden_size)


def tensor_parallel_groups(cfg: JobConfig, info: ModelInfo, workers: list[str]) -> list[str]:
    """The local devices cut into run.tensor_parallel-sized groups, one worker each; ConfigError
    (exit 2, before any weight loads) for what the model or the job cannot shard."""
    from pipeline.model.tensor_parallel import check_divides

    size = cfg.run.tensor_parallel
    if cfg.generation.engine != "fast":
        raise ConfigError("run.tensor_parallel > 1 needs generation.engine = \"fast\" (the hf engine runs on one device)")
    check_divides(loader.model_config(info).text_config, size)
    if cfg.run.executor != "local":
        return workers
    if workers == ["cpu"] and cfg.run.devices == ["auto"]:
        workers = ["cpu"] * size  # the CPU has no device count: "auto" gives the group its ranks
    return devices.device_groups(workers, size)


def job_prompt_length(cfg: JobConfig, manifest: Manifest, info: ModelInfo, processor) -> int:
    column = cfg.input.prompt_column
    return longest_job_prompt(processor, info, cfg.generation, manifest.max_bytes(column) if column else None)


def cache_record(cfg: JobConfig, manifest: Manifest, info: ModelInfo) -> dict:
    """The device-independent part of the cache plan, for `_job.json` (each worker's slots are in
    its shards' stats: they depend on its device's memory)."""
    processor = loader.load_processor(info, cfg.model.trust_remote_code)
    prompt, positions = slot_length(job_prompt_length(cfg, manifest, info, processor), cfg.generation)
    return {"max_batch_size": cfg.generation.max_batch_size, "prompt_length": prompt, "slot_length": positions}
