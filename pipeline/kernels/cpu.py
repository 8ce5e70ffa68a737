"""Our CPU kernels (pipeline/kernels/cpu.cpp), built on first use: decode attention and the small
fused ops of a decoder layer.

Decode attention: torch's CPU SDPA is built for long queries. For one query row it reads the cache
window through small GEMMs at a fraction of memory bandwidth, its bf16 path is slower still, and it
must read every slot up to the longest one's position. Ours streams each slot's keys and values once,
up to that slot's own length, in the cache's dtype (bf16 halves the bytes), accumulating in fp32 as
SDPA does.

RMSNorm and the rotary embedding: at decode shapes each is a chain of small eager torch ops, each
paying its fixed cost; ours are one call each, rounding at the same points as the transformers code
they replace (bit-identical but for the order of the RMS sum).

Compiled with the machine's C++ compiler (torch.utils.cpp_extension, cached in
TORCH_EXTENSIONS_DIR), registered as `torch.ops.llava_batch.*`. Every CPU kind builds it: the
vector paths (AVX-512, AVX2) sit under their compiler guards, and what this CPU has decides at build
time which one a build takes. Without a compiler `available()` is False and the decoder keeps torch's
SDPA and the transformers modules: slower, same results.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

from pipeline.errors import ConfigError
from pipeline.logs import log

SOURCE = Path(__file__).with_suffix(".cpp")
MAX_HEAD_DIM = 512
ENV = "LLAVA_BATCH_CPU_KERNELS"  # native (default) | avx2 | scalar | off

# Builds of the one source. "native" takes the widest vector path the compiler may use on this CPU
# (AVX-512, else AVX2, else plain C++ that gcc vectorises as it can, which is what aarch64 runs).
# The others switch vector paths off so that every machine also tests the narrower paths: an
# AVX-512 machine must not hide a broken AVX2 or scalar path.
VARIANTS = {"native": [], "avx2": ["-mno-avx512f"], "scalar": ["-DLB_SCALAR"]}


def arch_flags(machine: str | None = None) -> list[str]:
    """The compiler's tuning for this CPU: x86 takes -march=native, aarch64 -mcpu=native (gcc's
    spelling there); anything else builds generic code."""
    machine = machine or platform.machine()
    if machine in ("x86_64", "AMD64", "i686"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def cflags(variant: str, machine: str | None = None) -> list[str]:
    """Everything the build of `variant` passes to the compiler besides torch's own flags."""
    return ["-O3", *arch_flags(machine), "-ffp-contract=off", *VARIANTS[variant],
            f"-DLB_NAMESPACE={namespace(variant)}"]


def namespace(variant: str) -> str:
    """Each build registers its ops under its own name, so several builds can load in one process."""
    return "llava_batch" if variant == "native" else f"llava_batch_{variant}"


def testable_variants() -> list[str]:
    """The builds whose code this CPU can run and that differ from each other here."""
    flags = _cpu_flags()
    variants = ["native"]
    if {"avx512f", "avx2", "fma", "f16c"} <= flags:  # native is the AVX-512 path: AVX2 is another
        variants.append("avx2")
    return [*variants, "scalar"]


def selected() -> str | None:
    """The build the engine uses: $LLAVA_BATCH_CPU_KERNELS, else native; None for `off`."""
    variant = os.environ.get(ENV, "native").strip() or "native"
    if variant == "off":
        return None
    if variant not in VARIANTS:
        raise ConfigError(f"{ENV}={variant!r}: expected one of {', '.join([*VARIANTS, 'off'])}")
    return variant


@functools.cache
def build(variant: str):
    """The ops of one build, compiled and loaded once per process; None (said once) when
    that fails: no compiler, no headers, a compiler that does not know this CPU."""
    # Importing cpp_extension warns that there is no CUDA runtime, which CPU kernels do not need.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        name = f"llava_batch_cpu_kernels_{variant}_{_cpu_id()}"
        with _build_lock(name, cpp_extension):
            cpp_extension.load(name=name, sources=[str(SOURCE)], is_python_module=False,
                               extra_cflags=cflags(variant), verbose=False)
        ops = getattr(torch.ops, namespace(variant))
        ops.rope  # noqa: B018 - raises when the library did not register
        return ops
    except Exception as e:  # noqa: BLE001 - the engine falls back to SDPA and torch's ops
        log.warning(f"CPU kernels ({variant}) unavailable ({type(e).__name__}: {e}); using SDPA")
        return None


@contextlib.contextmanager
def _build_lock(name: str, cpp_extension):
    """Builds of one name, one process at a time, under a lock the kernel drops when its holder dies.

    cpp_extension's own lock is a file that waits, without end, while it exists: a process killed
    mid-build (kill -9, a node dying) leaves it behind, and every later run would hang on it. Holding
    ours, no live process of ours is building this name, so a torch lock found then is a dead one's."""
    directory = getattr(cpp_extension, "_get_build_directory", None)  # private: absent, nothing to do
    if directory is None:
        yield
        return
    build_dir = Path(directory(name, False))
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "llava-batch.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        # Newer torch holds that file under an advisory lock of its own (it stays, and must not be
        # removed); only the older FileBaton lock is one whose mere existence blocks.
        if hasattr(cpp_extension, "FileBaton") and stale.exists():
            log.warning(f"removing a dead build's lock ({stale})")
            stale.unlink(missing_ok=True)
        yield


def available() -> bool:
    """Whether the engine's build of our kernels is there (compiling it on first use)."""
    variant = selected()
    return variant is not None and build(variant) is not None


def expected_path(variant: str) -> str:
    """The vector path (avx512 | avx2 | scalar) the build of `variant` must take on this CPU."""
    flags = _cpu_flags()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    if variant == "scalar" or not avx2:
        return "scalar"
    return "avx512" if variant == "native" and {"avx512f", "avx512bw", "avx512vl"} <= flags else "avx2"


def vector_path(variant: str | None = None) -> str:
    """The vector path the build of `variant` (default: the engine's) took."""
    return _ops(variant).vector_path()


def _ops(variant: str | None):
    """The ops of `variant`, else of the engine's build; an error where there is none (or `off`)."""
    variant = variant or selected()
    ops = build(variant) if variant is not None else None
    if ops is None:
        raise RuntimeError("llava-batch CPU kernels are not available")
    return ops


def _cpu_flags() -> set[str]:
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return set()
    return set(line.partition(":")[2].split())


def _cpu_id() -> str:
    """Built for this CPU: a build cache shared by different CPUs (an NFS home) must not hand one
    CPU's binary to another, which could die of an illegal instruction."""
    flags = " ".join(sorted(_cpu_flags())) or platform.processor() or platform.machine()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the ninja wheel (a dependency) may sit in an
    un-activated virtual environment."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def usable(cache: torch.Tensor) -> bool:
    """Whether decode steps over this cache ([..., head_dim]) run the kernel."""
    return cache.device.type == "cpu" and cache.shape[-1] <= MAX_HEAD_DIM and available()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     lengths: torch.Tensor, sliding_window: int | None, scale: float,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None, variant: str | None = None
                     ) -> torch.Tensor:
    """One decode step's attention for the first n slots, in one call.

    q [n, 1, heads, head_dim], k, v [n, 1, kv_heads, head_dim] as projected; rope = (cos, sin)
    [n, 1, head_dim] is applied to q and k first when given. k, v are written into one layer's cache
    keys/values [slots, kv_heads, max_len, head_dim] at position lengths[i] - 1 of slot i, then q
    attends over the slot's positions [0, lengths[i]) (the last sliding_window of them).
    Returns [n, 1, heads * head_dim], ready for o_proj.
    """
    cos, sin = rope if rope is not None else (None, None)
    return _ops(variant).decode_attention(q, k, v, keys, values, lengths, sliding_window or 0, scale, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str | None = None) -> torch.Tensor:
    """LlamaRMSNorm.forward: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), over the last dim."""
    shape = x.shape
    return _ops(variant).rms_norm(x.reshape(-1, shape[-1]), weight, eps).view(shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, variant: str | None = None) -> torch.Tensor:
    """apply_rotary_pos_emb on x [batch, seq, heads, head_dim] (head_dim contiguous), cos/sin
    [batch, seq, head_dim] -> a new [batch, seq, heads, head_dim] tensor."""
    return _ops(variant).rope(x, cos, sin)
