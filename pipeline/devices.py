"""The only module that knows about npu / cuda / cpu.

torch_npu is imported here and nowhere else (code running npu ops gets it from `npu_ops()`), and
only on an Ascend host: installing it without CANN makes `import torch` itself fail, so its mere
presence is no proof it can be used.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ConfigError

_ASCEND_ENV = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def is_ascend_host() -> bool:
    return any(os.environ.get(v) for v in _ASCEND_ENV) or Path("/usr/local/Ascend").is_dir()


@functools.cache
def torch_npu():
    """The torch_npu module on an Ascend host with it installed, else None."""
    if not is_ascend_host():
        return None
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        return None


def npu_ops():
    """torch_npu, for code that only runs on npu tensors (its own ops, e.g. npu_weight_quant_batchmatmul)."""
    mod = torch_npu()
    if mod is None:
        raise RuntimeError("an npu kernel was called on a host without a usable torch_npu")
    return mod


def npu_available() -> bool:
    mod = torch_npu()
    return bool(mod) and torch.npu.is_available()


def device_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "npu":
        return torch.npu.device_count() if npu_available() else 0
    return 1


def resolve_device(spec: str) -> torch.device:
    """`auto` picks npu, then cuda, then cpu; an explicit device that is absent is a ConfigError."""
    if spec == "auto":
        for kind in ("npu", "cuda"):
            if device_count(kind):
                return torch.device(kind, 0)
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    count = device_count(kind)
    idx = int(index) if index.isdigit() else 0
    if index and not index.isdigit():
        raise ConfigError(f"model.device: bad device index in {spec!r}")
    if idx >= count:
        raise ConfigError(f"model.device = {spec!r} but this host has {count} {kind} device(s)")
    return torch.device(kind, idx)


_VISIBLE_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}


def worker_devices(run_devices: list[str], model_device: str) -> list[str]:
    """One device string per worker, validated: run.devices, else model.device, else auto.

    `auto` means every visible accelerator (data parallel), else one CPU worker.
    """
    if run_devices != ["auto"]:
        try:
            return [str(resolve_device(d)) for d in run_devices]
        except ConfigError as e:
            raise ConfigError(f"run.devices: {e}".replace("model.device", "device")) from None
    if model_device != "auto":
        return [str(resolve_device(model_device))]
    for kind in ("npu", "cuda"):
        if n := device_count(kind):
            return [f"{kind}:{i}" for i in range(n)]
    return ["cpu"]


def worker_env(device: str, cpu_workers: int) -> tuple[dict[str, str], str]:
    """(environment for a fresh worker process, the device it then names) for `device`, or for a
    tensor parallel group "dev+dev+...".

    The worker sees only its own accelerators, set before torch initialises them, so it names them
    from index 0. An index counts within what this process already sees (a scheduler may have set it).
    """
    group = device.split("+")
    kind = group[0].partition(":")[0]
    if kind == "cpu":
        # Several CPU workers (and ranks) share the cores instead of each spawning a thread per core.
        threads = str(max(1, (os.cpu_count() or 1) // max(1, cpu_workers * len(group))))
        return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads}, "+".join(["cpu"] * len(group))
    var = _VISIBLE_ENV[kind]
    visible = [v for v in os.environ.get(var, "").split(",") if v.strip()]
    ids = []
    for spec in group:
        idx = int(spec.partition(":")[2] or 0)
        ids.append(visible[idx] if idx < len(visible) else str(idx))
    return {var: ",".join(ids)}, "+".join(f"{kind}:{i}" for i in range(len(group)))


def ray_actor_options(kind: str, ranks: int = 1) -> tuple[dict, str]:
    """(Ray actor resources, the device the actor then names) for a worker of `kind` with `ranks`
    tensor parallel ranks.

    Ray sets ASCEND_RT_VISIBLE_DEVICES for its built-in NPU resource and CUDA_VISIBLE_DEVICES for
    num_gpus, so, as in a local worker process, the actor names its devices from index 0. One actor
    holds a whole group: Ray places an actor's resources on one node, so the ranks are packed there.
    """
    group = "+".join(f"{kind}:{i}" for i in range(ranks)) if kind != "cpu" else "+".join(["cpu"] * ranks)
    if kind == "npu":
        return {"resources": {"NPU": ranks}, "num_cpus": 1}, group
    if kind == "cuda":
        return {"num_gpus": ranks, "num_cpus": 1}, group
    return {"num_cpus": ranks}, group


def collective_backend(device: torch.device) -> str:
    """torch.distributed's backend for tensor parallel ranks on `device`."""
    return {"npu": "hccl", "cuda": "nccl"}.get(device.type, "gloo")


def device_groups(workers: list[str], size: int) -> list[str]:
    """`workers` (one device each) cut into groups of `size`, each written "dev+dev+..." (one worker
    of `size` ranks); ConfigError when they do not divide."""
    if size == 1:
        return workers
    if len(workers) < size or len(workers) % size:
        raise ConfigError(f"run.tensor_parallel = {size} needs a multiple of {size} devices, "
                          f"got {len(workers)} ({', '.join(workers)})")
    return ["+".join(workers[i:i + size]) for i in range(0, len(workers), size)]


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on Ascend (what MindIE serves llava in), bf16 on CUDA when supported, fp32 on CPU."""
    if spec != "auto":
        return _DTYPES[spec]
    if device.type == "npu":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def compute_dtype(dtype: torch.dtype, device: torch.device, weight_bytes: int) -> torch.dtype:
    """The dtype the model runs in: the job's, except bf16 on a CPU with no bf16 arithmetic (no
    AVX-512 BF16 / AMX on x86, no BF16 extension on aarch64). There torch emulates every bf16
    matmul far slower than it runs fp32, so the model runs in fp32 when its fp32 weights
    (twice `weight_bytes`, the bf16 ones) fit in what the host has free with room to spare."""
    if device.type != "cpu" or dtype != torch.bfloat16 or cpu_has_bf16():
        return dtype
    free = free_memory_bytes(device)
    return torch.float32 if free is not None and 2 * weight_bytes < 0.6 * free else dtype


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (what oneDNN's bf16 kernels need)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # torch_npu and the CPU allocator report OOM as a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "npu" and npu_available():
        torch.npu.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu" and npu_available():
        torch.npu.synchronize(device)


@dataclass(frozen=True)
class GraphAPI:
    """One accelerator's graph capture, in torch.cuda's shape: `graph()` makes an empty graph,
    `capture(g, pool=...)` records the ops run inside it, `pool()` a memory pool graphs share."""

    graph: Callable[[], object]
    capture: Callable[..., AbstractContextManager]
    pool: Callable[[], object]


def graph_api(device: torch.device) -> GraphAPI | None:
    """CUDA graphs on CUDA, ACL graphs (torch_npu's NPUGraph) on Ascend, None where there are none (CPU)."""
    if device.type == "cuda":
        return GraphAPI(torch.cuda.CUDAGraph, torch.cuda.graph, torch.cuda.graph_pool_handle)
    if device.type == "npu" and npu_available():
        return GraphAPI(torch.npu.NPUGraph, torch.npu.graph, torch.npu.graph_pool_handle)
    return None


def kv_cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The model dtype, as transformers keeps it. On a CPU without our decode-attention kernel
    (pipeline/kernels/cpu.py) fp32: torch's bf16/fp16 SDPA for one query row runs several times
    slower than its fp32 one, which outweighs reading a cache twice the size."""
    if device.type == "cpu":
        from pipeline.kernels import cpu as cpu_kernels  # compiles the kernel on first use

        return dtype if cpu_kernels.available() else torch.float32
    return dtype


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory the device can still hand out (host MemAvailable for the CPU); None when unknown.
    On an accelerator that includes what torch's caching allocator holds but no tensor uses."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    if device.type == "npu" and npu_available():
        return torch.npu.mem_get_info(device)[0] + torch.npu.memory_reserved(device) - \
            torch.npu.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
