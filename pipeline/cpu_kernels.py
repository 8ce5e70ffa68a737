"""Our CPU kernels (pipeline/cpu_kernels.cpp), built on first use: decode attention and the small
fused ops of a decoder layer.

Decode attention: torch's CPU SDPA is built for long queries. For one query row it reads the cache
window through small GEMMs at a fraction of memory bandwidth (fp32, 16 slots, 160 positions: ~700 us
a layer in a decode step on the dev VM), its bf16 path is slower still, and it must read every slot
up to the longest one's position. Ours streams each slot's keys and values once, up to that slot's
own length, in the cache's dtype (bf16 halves the bytes), accumulating in fp32 as SDPA does.

RMSNorm and the rotary embedding: at decode shapes each is 6-12 eager torch ops of a few
microseconds (24 and 36 us at 16 rows, bf16); ours are one call each (10 and 13 us), rounding at the
same points as the transformers code they replace (bit-identical but for the order of the RMS sum).

Compiled with the machine's C++ compiler (torch.utils.cpp_extension, cached in
TORCH_EXTENSIONS_DIR), registered as `torch.ops.llava_batch.*`. Without a compiler `available()` is
False and the decoder keeps torch's SDPA and the transformers modules: slower, same results.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".cpp")
MAX_HEAD_DIM = 512


@functools.cache
def available() -> bool:
    """Compile and load the kernel once per process; False (said once on stderr) when that fails."""
    # Importing cpp_extension warns that there is no CUDA runtime, which CPU kernels do not need.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        cpp_extension.load(
            name=f"llava_batch_cpu_kernels_{_cpu_id()}", sources=[str(SOURCE)], is_python_module=False,
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off"], verbose=False)
        return hasattr(torch.ops.llava_batch, "rope")
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: SDPA still works
        print(f"llava-batch: CPU kernels unavailable ({type(e).__name__}: {e}); using SDPA",
              file=sys.stderr)
        return False


def _cpu_id() -> str:
    """Built with -march=native: a build cache shared by different CPUs (an NFS home) must not hand
    one CPU's binary to another, which could die of an illegal instruction."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
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
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One decode step's attention for the first n slots, in one call.

    q [n, 1, heads, head_dim], k, v [n, 1, kv_heads, head_dim] as projected; rope = (cos, sin)
    [n, 1, head_dim] is applied to q and k first when given. k, v are written into one layer's cache
    keys/values [slots, kv_heads, max_len, head_dim] at position lengths[i] - 1 of slot i, then q
    attends over the slot's positions [0, lengths[i]) (the last sliding_window of them).
    Returns [n, 1, heads * head_dim], ready for o_proj.
    """
    cos, sin = rope if rope is not None else (None, None)
    return torch.ops.llava_batch.decode_attention(q, k, v, keys, values, lengths, sliding_window or 0, scale, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), over the last dim."""
    shape = x.shape
    return torch.ops.llava_batch.rms_norm(x.reshape(-1, shape[-1]), weight, eps).view(shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb on x [batch, seq, heads, head_dim] (head_dim contiguous), cos/sin
    [batch, seq, head_dim] -> a new [batch, seq, heads, head_dim] tensor."""
    return torch.ops.llava_batch.rope(x, cos, sin)
