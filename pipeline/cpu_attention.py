"""Decode attention on the CPU: one query row per slot over that slot's own cache positions.

torch's CPU SDPA is built for long queries. For one query row it reads the cache window through
small GEMMs at a fraction of memory bandwidth (fp32, 16 slots, 160 positions: ~700 us a layer in a
decode step on the dev VM), its bf16 path is slower still, and it must read every slot up to the
longest one's position. This kernel streams each slot's keys and values once, up to that slot's own
length, in the cache's dtype (bf16 halves the bytes), accumulating in fp32 as SDPA does.

It is compiled on first use with the machine's C++ compiler (torch.utils.cpp_extension, cached in
TORCH_EXTENSIONS_DIR) and registered as `torch.ops.llava_batch.decode_attention`. Without a compiler
`available()` is False and the decoder keeps SDPA: slower, same results.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys

import torch

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

namespace {

inline float widen(float x) { return x; }

inline float widen(c10::BFloat16 x) {  // exact: bf16 is the top half of an fp32
  uint32_t w = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline float widen(c10::Half x) { return static_cast<float>(x); }

constexpr int kMaxDim = 512;

#if defined(__AVX512F__)
// 16 lanes of a row as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// q . k over dim lanes. D > 0 is dim known at compile time (the loops then unroll).
template <typename T, int D>
inline float score(const float* q, const T* k, int dim) {
  if (D) dim = D;
#if defined(__AVX512F__)
  if (dim % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int j = 0; j < dim; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), load16(k + j), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float acc = 0.f;
  for (int i = 0; i < dim; ++i) acc += q[i] * widen(k[i]);
  return acc;
}

// out = sum_t p[t] * v[t] over n positions `stride` elements apart.
template <typename T, int D>
inline void weighted_sum(const float* p, const T* v, int64_t n, int64_t stride, float* out, int dim) {
  if (D) dim = D;
#if defined(__AVX512F__)
  if (dim % 16 == 0) {
    __m512 acc[kMaxDim / 16];
    for (int j = 0; j < dim / 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m512 w = _mm512_set1_ps(p[t]);
      for (int j = 0; j < dim / 16; ++j) acc[j] = _mm512_fmadd_ps(w, load16(v + t * stride + 16 * j), acc[j]);
    }
    for (int j = 0; j < dim / 16; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
    return;
  }
#endif
  std::fill(out, out + dim, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int i = 0; i < dim; ++i) out[i] += p[t] * widen(v[t * stride + i]);
}

// One (slot, kv head): the `rep` query heads that share it, over positions [start, length).
template <typename T, int D>
void attend(const float* q, const T* k, const T* v, float* out, int64_t rep, int64_t start, int64_t length,
            int64_t stride, int dim, float scale, std::vector<float>& scores) {
  const int64_t n = length - start;
  scores.resize(n);
  float* s = scores.data();
  for (int64_t r = 0; r < rep; ++r) {
    for (int64_t t = 0; t < n; ++t) s[t] = score<T, D>(q + r * dim, k + (start + t) * stride, dim) * scale;
    const float top = *std::max_element(s, s + n);
    float total = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      s[t] = std::exp(s[t] - top);
      total += s[t];
    }
    const float inv = 1.f / total;
    for (int64_t t = 0; t < n; ++t) s[t] *= inv;
    weighted_sum<T, D>(s, v + start * stride, n, stride, out + r * dim, dim);
  }
}

// q [n, heads, dim]; keys/values [slots >= n, kv_heads, max_len, dim] (one layer of the cache);
// lengths [n]: slot i attends to its positions [max(0, lengths[i] - sliding_window), lengths[i]).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& lengths, int64_t sliding_window, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(), "decode_attention: bad ranks");
  TORCH_CHECK(keys.stride(3) == 1 && values.strides() == keys.strides(), "decode_attention: cache layout");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "decode_attention: key/value dtypes differ");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = keys.size(1);
  TORCH_CHECK(keys.size(0) >= n && keys.size(3) == dim && heads % kv_heads == 0, "decode_attention: shapes");
  TORCH_CHECK(dim <= kMaxDim, "decode_attention: head_dim ", dim);
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  TORCH_CHECK(len.numel() == n, "decode_attention: one length per row");
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(lp[i] >= 1 && lp[i] <= keys.size(2), "decode_attention: length");
  at::Tensor out = at::empty({n, heads, dim}, qf.options());
  const int64_t rep = heads / kv_heads;
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / kv_heads, g = task % kv_heads;
        const int64_t length = lp[i];
        const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, length - sliding_window) : 0;
        const int64_t base = i * keys.stride(0) + g * keys.stride(1);
        const int64_t head = (i * heads + g * rep) * dim;
        const auto run = [&](auto d) {
          attend<scalar_t, decltype(d)::value>(qp + head, kp + base, vp + base, op + head, rep, start, length,
                                               keys.stride(2), dim, static_cast<float>(scale), scores);
        };
        if (dim == 128) run(std::integral_constant<int, 128>{});  // llava's language models
        else if (dim == 64) run(std::integral_constant<int, 64>{});
        else run(std::integral_constant<int, 0>{});
      }
    });
  };
  switch (keys.scalar_type()) {
    case at::kFloat: kernel(float{}); break;
    case at::kBFloat16: kernel(c10::BFloat16{}); break;
    case at::kHalf: kernel(c10::Half{}); break;
    default: TORCH_CHECK(false, "decode_attention: cache dtype ", keys.scalar_type());
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(llava_batch, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor lengths, int sliding_window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llava_batch, CPU, m) { m.impl("decode_attention", &decode_attention); }
"""


MAX_HEAD_DIM = 512


@functools.cache
def available() -> bool:
    """Compile and load the kernel once per process; False (said once on stderr) when that fails."""
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        # It warns that there is no CUDA runtime, which a CPU kernel does not need.
        logging.getLogger(cpp_extension.__name__).setLevel(logging.ERROR)
        cpp_extension.load_inline(
            name="llava_batch_decode_attention", cpp_sources=[_SOURCE], is_python_module=False,
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
        return hasattr(torch.ops.llava_batch, "decode_attention")
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: SDPA still works
        print(f"llava-batch: CPU decode-attention kernel unavailable ({type(e).__name__}: {e}); using SDPA",
              file=sys.stderr)
        return False


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


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     sliding_window: int | None, scale: float) -> torch.Tensor:
    """q [n, heads, head_dim] against one layer's cache [slots, kv_heads, max_len, head_dim]; slot i
    sees its positions [0, lengths[i]) (the last sliding_window of them); -> [n, heads, head_dim]."""
    return torch.ops.llava_batch.decode_attention(q, keys, values, lengths, sliding_window or 0, scale)
