"""How many KV-cache slots a job gets and how long each one is: the fast engine's memory plan.

A slot holds the longest prompt this job can produce (pipeline/model/prompt_length.py: the model's
image-token arithmetic plus the text) and max_output_length new tokens. Reserving max_input_length
for every slot instead leaves most of the cache to prompts that never come. With
`generation.max_batch_size = "auto"` the slots are what fits in the device's free memory once the
weights are loaded, after setting aside the largest activation one step makes (a refill's prefill and
its vision-tower pass) and a margin; decode reads every weight once a step whatever the batch, so
the slots are where an accelerator's speed is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pipeline import devices
from pipeline.config import GenerationConfig
from pipeline.errors import ConfigError
from pipeline.model import prompt_length
from pipeline.model.kv_cache import attention_dims

# Past these, a step's rows stop paying: vLLM and nano-vllm cap their batches the same way. On the
# CPU a step's cost grows with its rows almost from the first one; the cap is the slot count the CPU
# caption workloads ran best at (benchmarks/RESULTS.md, W1 by slot count).
ACCELERATOR_MAX_SLOTS = 256
CPU_MAX_SLOTS = 16
# Of the memory free after the weights, the share left to the allocator's fragmentation, the
# runtime's own buffers and the captured graphs' pool.
MARGIN = 0.10
# A refill prefills at most this many prompt tokens in one step (the other rows come in the next
# steps), which bounds the activation the plan must set aside.
PREFILL_TOKENS = 16384
GIB = 2**30


@dataclass(frozen=True)
class CachePlan:
    slots: int
    prompt_length: int  # the longest prompt a slot holds, tokens
    slot_length: int  # prompt_length + max_output_length: the cache positions of a slot
    prefill_rows: int  # the most rows one step prefills
    bytes_per_slot: int
    reserve_bytes: int  # set aside for one step's activations
    free_bytes: int | None  # what the device had free after the weights (None: unknown)
    limited_by: str  # "memory", "cap" or "max_batch_size"

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.bytes_per_slot

    def describe(self) -> dict:
        record = asdict(self)
        record["cache_gib"] = round(self.cache_bytes / GIB, 3)
        return record

    def line(self, device: torch.device) -> str:
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes / GIB:.1f} GiB"
        return (f"cache plan on {device}: {self.slots} slots x {self.slot_length} positions "
                f"(prompts <= {self.prompt_length} tokens) = {self.cache_bytes / GIB:.2f} GiB; "
                f"{free} free after the weights, {self.reserve_bytes / GIB:.2f} GiB kept for activations; "
                f"slots limited by {self.limited_by}")


def slot_length(prompt_length: int, gen: GenerationConfig) -> tuple[int, int]:
    """(prompt positions, all positions) of one slot: the longest prompt, capped by max_input_length."""
    prompt = min(prompt_length, gen.max_input_length)
    return prompt, prompt + gen.max_output_length


def bytes_per_slot(text_config, positions: int, itemsize: int, world: int = 1) -> int:
    """On one rank: under tensor parallel it holds 1/world of the KV heads."""
    _, kv_heads, head_dim = attention_dims(text_config)
    return 2 * text_config.num_hidden_layers * (kv_heads // world) * head_dim * positions * itemsize


def activation_bytes(config, rows: int, prompt_length: int, tiles: int, itemsize: int) -> int:
    """The most memory one prefill of `rows` prompts holds at once: the language model's widest
    tensors per token (hidden states, q/k/v, the fused gate/up and its product) and the vision
    tower's hidden states for `tiles` images a row, which transformers keeps for every layer to
    select from."""
    text = config.text_config
    tokens = rows * prompt_length
    per_token = itemsize * (6 * text.hidden_size + 3 * text.intermediate_size)
    logits = rows * text.vocab_size * 4
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    per_tile = itemsize * patches * ((vision.num_hidden_layers + 1) * vision.hidden_size + vision.intermediate_size)
    return tokens * per_token + logits + rows * tiles * per_tile


def vision_tiles(config, video_frames: int) -> int:
    """The most images one row sends through the vision tower: llava-v1.6's base image plus its
    largest anyres grid, or a video's frames."""
    tiles = 1
    if pinpoints := getattr(config, "image_grid_pinpoints", None):
        size = config.vision_config.image_size
        tiles += max((h // size) * (w // size) for h, w in pinpoints)
    if getattr(config, "video_token_index", None) is not None:
        tiles = max(tiles, video_frames)
    return tiles


def plan_cache(config, gen: GenerationConfig, prompt_length: int, device: torch.device, kv_dtype: torch.dtype,
               free_bytes: int | None, world: int = 1) -> CachePlan:
    """The plan for this job on `device`, given what it has free after the weights; ConfigError when
    not even one slot (or the job's explicit max_batch_size) fits."""
    prompt, positions = slot_length(prompt_length, gen)
    per_slot = bytes_per_slot(config.text_config, positions, kv_dtype.itemsize, world)
    itemsize = kv_dtype.itemsize
    auto = gen.max_batch_size == "auto"
    cap = (CPU_MAX_SLOTS if device.type == "cpu" else ACCELERATOR_MAX_SLOTS) if auto else gen.max_batch_size
    rows = min(cap, max(1, PREFILL_TOKENS // prompt))
    reserve = activation_bytes(config, rows, prompt, vision_tiles(config, gen.video_frames), itemsize)
    if free_bytes is None:
        return CachePlan(cap, prompt, positions, rows, per_slot, reserve, None, "cap" if auto else "max_batch_size")
    usable = int(free_bytes * (1 - MARGIN)) - reserve
    fits = max(0, usable // per_slot)
    if not auto:
        if fits < cap:
            raise ConfigError(_too_small(f"generation.max_batch_size={cap}", cap, positions, per_slot, reserve,
                                         free_bytes, device))
        return CachePlan(cap, prompt, positions, rows, per_slot, reserve, free_bytes, "max_batch_size")
    if fits < 1:
        raise ConfigError(_too_small("one slot", 1, positions, per_slot, reserve, free_bytes, device))
    slots = min(cap, fits)
    return CachePlan(slots, prompt, positions, min(rows, slots), per_slot, reserve, free_bytes,
                     "cap" if slots == cap else "memory")


def _too_small(what: str, slots: int, positions: int, per_slot: int, reserve: int, free: int,
               device: torch.device) -> str:
    need = slots * per_slot + reserve
    return (f"the KV cache for {what} x {positions} positions (the longest prompt + max_output_length) and "
            f"one step's activations need {need / GIB:.1f} GiB, but {device} has {free / GIB:.1f} GiB free "
            f"after the weights (keeping {MARGIN:.0%} spare); lower generation.max_input_length, "
            "max_output_length or max_batch_size")


def longest_job_prompt(processor, info, gen: GenerationConfig, column_bytes: int | None = None) -> int:
    """The longest prompt, in tokens, this job can give the model: its prompt (or prompts), or a
    prompt column's longest value (`column_bytes`, in the most tokens that many bytes can make), with
    the media kinds the model takes."""
    kinds = ["image", "video"] if info.supports_video else ["image"]
    texts = list(gen.prompts.values()) if gen.prompts else [gen.prompt]
    longest = prompt_length.longest_prompt(processor, info, texts, kinds, gen.video_frames)
    if column_bytes is not None:
        bare = prompt_length.longest_prompt(processor, info, [""], kinds, gen.video_frames)
        longest = max(longest, bare + prompt_length.text_token_bound(column_bytes))
    return longest


def plan_for_model(model, gen: GenerationConfig, device: torch.device, prompt_length: int | None = None) -> CachePlan:
    """The plan for a loaded `model`: slots against what `device` has free now when they are "auto"
    (an explicit max_batch_size is taken as given); prompts up to max_input_length unless told."""
    kv_dtype = devices.kv_cache_dtype(device, next(model.parameters()).dtype)
    free = devices.free_memory_bytes(device) if gen.max_batch_size == "auto" else None
    return plan_cache(model.config, gen, prompt_length or gen.max_input_length, device, kv_dtype, free)
