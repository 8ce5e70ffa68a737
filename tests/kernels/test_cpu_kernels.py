"""Our CPU kernels against what they replace. Decode attention against SDPA with an explicit mask:
every dtype the cache may have, grouped-query attention, a sliding window, the head sizes it unrolls
and the generic one, and the step's keys and values written where the next steps will read them and
nowhere else. RMSNorm and rope against transformers' own code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from pipeline.kernels import cpu as cpu_kernels


def reference(q, keys, values, lengths, sliding_window, scale):
    q = q[:, 0]
    n, heads, dim = q.shape
    width = int(lengths.max())
    j, length = torch.arange(width)[None, :], lengths[:, None]
    mask = j < length
    if sliding_window:
        mask &= j >= length - sliding_window
    k, v = keys[:n, :, :width].float(), values[:n, :, :width].float()
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale,
                                         enable_gqa=heads != keys.shape[1])
    return out[:, :, 0].reshape(n, 1, heads * dim)


@pytest.fixture(scope="module", params=cpu_kernels.testable_variants())
def variant(request) -> str:
    """Every build this CPU can run: the native one (its widest vector path) and the narrower ones,
    so a machine with AVX-512 still tests the AVX2 and the plain C++ paths."""
    assert cpu_kernels.build(request.param) is not None, f"our CPU kernels ({request.param}) did not build"
    return request.param


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("heads,kv_heads,dim,window", [(8, 8, 64, None), (8, 2, 128, None), (4, 4, 16, 5),
                                                       (6, 3, 40, None)])
def test_matches_sdpa(dtype, tol, heads, kv_heads, dim, window, variant):
    torch.manual_seed(0)
    keys, values = (torch.randn(6, kv_heads, 50, dim).to(dtype) for _ in range(2))
    qkv = torch.randn(4, 1, heads + 2 * kv_heads, dim).to(dtype)  # q, k, v: head slices of one projection
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    lengths = torch.tensor([1, 7, 50, 33])
    expected_keys, expected_values = keys.clone(), values.clone()
    for i, n in enumerate(lengths.tolist()):
        expected_keys[i, :, n - 1], expected_values[i, :, n - 1] = k[i, 0], v[i, 0]
    got = cpu_kernels.decode_attention(q, k, v, keys, values, lengths, window, dim ** -0.5, variant=variant)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert got.dtype == dtype and got.shape == (4, 1, heads * dim)
    torch.testing.assert_close(got.float(), reference(q, keys, values, lengths, window, dim ** -0.5),
                               rtol=tol, atol=tol)


def test_positions_past_a_rows_length_are_never_read(variant):
    keys, values = torch.randn(2, 2, 30, 64), torch.randn(2, 2, 30, 64)
    (q, k, v), lengths = (torch.randn(2, 1, 2, 64) for _ in range(3)), torch.tensor([9, 20])
    before = cpu_kernels.decode_attention(q, k, v, keys, values, lengths, None, 0.125, variant=variant)
    keys[0, :, 9:], values[1, :, 20:] = float("nan"), float("inf")
    assert torch.equal(cpu_kernels.decode_attention(q, k, v, keys, values, lengths, None, 0.125, variant=variant), before)


def test_bad_lengths_are_refused(variant):
    keys, new = torch.randn(2, 2, 30, 64), torch.randn(2, 1, 2, 64)
    for lengths in ([0, 5], [5, 31]):
        with pytest.raises(RuntimeError, match="length"):
            cpu_kernels.decode_attention(new, new, new, keys, keys.clone(), torch.tensor(lengths), None, 0.125, variant=variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_inside_attention_is_rope_then_attention(dtype, variant):
    torch.manual_seed(0)
    keys, values = (torch.randn(3, 2, 20, 64).to(dtype) for _ in range(2))
    q, k, v = (torch.randn(3, 1, h, 64).to(dtype) for h in (4, 2, 2))
    cos, sin = (torch.randn(3, 1, 64).to(dtype) for _ in range(2))
    lengths = torch.tensor([5, 20, 1])
    apart = keys.clone(), values.clone()
    expected = cpu_kernels.decode_attention(cpu_kernels.rope(q, cos, sin), cpu_kernels.rope(k, cos, sin), v, *apart,
                                            lengths, None, 0.125, variant=variant)
    got = cpu_kernels.decode_attention(q, k, v, keys, values, lengths, None, 0.125, rope=(cos, sin), variant=variant)
    assert torch.equal(got, expected) and torch.equal(keys, apart[0]) and torch.equal(values, apart[1])


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of x, in x's dtype, as fp32."""
    exponent = torch.floor(torch.log2(x.float().abs().clamp_min(torch.finfo(x.dtype).tiny)))
    return torch.finfo(x.dtype).eps * torch.exp2(exponent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [512, 40])
def test_rms_norm_matches_the_transformers_module(dtype, hidden, variant):
    """The contract: every intermediate is rounded where transformers rounds it; the one freedom is
    the order of the fp32 sum of squares, which torch itself changes with the CPU's vector width. The
    inverse RMS may then differ in its last bits, and a normalised value y = (x / rms).to(dtype) that
    sits near a rounding boundary lands one unit in its last place away, which the weight then scales:
    never more than weight * ulp(y) plus the product's own rounding, and rarely."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(hidden, eps=1e-6).to(dtype)
    norm.weight.data.normal_()
    x = torch.randn(16, 3, hidden).to(dtype)
    got, expected = cpu_kernels.rms_norm(x, norm.weight, 1e-6, variant=variant), norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        return
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    bound = norm.weight.detach().float().abs() * ulp(y) + torch.maximum(ulp(got), ulp(expected))
    off = (got.float() - expected.float()).abs()
    assert bool((off <= bound).all()), f"{off.max()} is more than one ulp of the normalised value away"
    assert (off > 0).float().mean() <= 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 8, 40])
def test_rope_matches_transformers_bit_for_bit(dtype, head_dim, variant):
    torch.manual_seed(0)
    qkv = torch.randn(4, 3, 10, head_dim).to(dtype)  # q and k are head slices of one projection
    cos, sin = (torch.randn(4, 3, head_dim).to(dtype) for _ in range(2))
    q, k = qkv[:, :, :6], qkv[:, :, 6:8]
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(cpu_kernels.rope(q, cos, sin, variant=variant).transpose(1, 2), expected_q)
    assert torch.equal(cpu_kernels.rope(k, cos, sin, variant=variant).transpose(1, 2), expected_k)


def test_each_build_takes_the_vector_path_it_is_named_for(variant):
    assert cpu_kernels.vector_path(variant) == cpu_kernels.expected_path(variant)


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next(tmp_path, monkeypatch):
    """A build killed mid-way leaves cpp_extension's lock file; the next build must not wait on it.

    Older torch (FileBaton) waits while the file exists, so it must be removed; newer torch holds
    the file under an advisory lock (filelock), which dies with its holder, so the file stays."""
    from filelock import FileLock
    from torch.utils import cpp_extension

    baton = hasattr(cpp_extension, "FileBaton")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    take_torch_lock = "(d / 'lock').touch()" if baton else "g = open(d / 'lock', 'w'); fcntl.flock(g, fcntl.LOCK_EX)"
    killed = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, pathlib, sys, time; from torch.utils import cpp_extension as c\n"
        "d = pathlib.Path(c._get_build_directory('lb_test', False)); d.mkdir(parents=True, exist_ok=True)\n"
        f"f = open(d / 'llava-batch.flock', 'w'); fcntl.flock(f, fcntl.LOCK_EX); {take_torch_lock}\n"
        "print('building', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "building"
    killed.kill()  # kill -9 mid-build: its flocks go, torch's lock file stays
    killed.wait()
    lock = Path(cpp_extension._get_build_directory("lb_test", False)) / "lock"
    assert lock.exists()
    with cpu_kernels._build_lock("lb_test", cpp_extension):
        if baton:
            assert not lock.exists()
        else:
            with FileLock(str(lock), timeout=10):  # what torch takes next: free at once
                assert lock.exists()


def test_the_ninja_wheel_is_found_without_an_activated_venv(monkeypatch):
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    cpu_kernels._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
