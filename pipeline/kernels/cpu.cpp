// llava-batch's CPU ops (pipeline/kernels/cpu.py builds and loads them): decode attention with rope and the
// cache write fused in, RMSNorm and rope. One file, over the ~300 lines a module is kept to, on purpose: the
// AVX-512, AVX2 and plain C++ paths are one algorithm written once over the small `V` vector layer below, and
// splitting them apart would let the three drift.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

// The vector path of this build, chosen by what the compiler may use (-march=native, -mno-avx512f):
// LB_AVX512, else LB_AVX2, else plain C++ (aarch64, old x86, and -DLB_SCALAR to test it anywhere).
#if !defined(LB_SCALAR) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LB_AVX512 1
#elif !defined(LB_SCALAR) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LB_AVX2 1
#endif
#if defined(LB_AVX512) || defined(LB_AVX2)
#include <immintrin.h>
#endif

// Each build registers under its own namespace (cpu_kernels.namespace), so several load at once.
#ifndef LB_NAMESPACE
#define LB_NAMESPACE llava_batch
#endif
#define LB_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LB_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

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

// Every intermediate that torch would hold in a tensor of dtype T is rounded to T (exact for fp32).
template <typename T>
inline float round_to(float x) { return static_cast<float>(static_cast<T>(x)); }

#if defined(LB_AVX512) || defined(LB_AVX2)
using BF16 = c10::BFloat16;
using Half = c10::Half;

#if defined(LB_AVX512)
// The vector ops the kernels are written in, on N fp32 lanes; rows of fp32, bf16 or fp16 widen as
// they load and round as they store. loadn/storen touch only the first n (< N) elements.
struct V {
  using F = __m512;
  static constexpr int N = 16;
  static __mmask16 lanes(int64_t n) { return n >= N ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static float reduce_add(F x) { return _mm512_reduce_add_ps(x); }
  static float reduce_max(F x) { return _mm512_reduce_max_ps(x); }
  static F max_first(F top, F x, int64_t n) { return _mm512_mask_max_ps(top, lanes(n), x, top); }
  static F add_first(F total, F x, int64_t n) { return _mm512_mask_add_ps(total, lanes(n), total, x); }
  static F round_nearest(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F scale_by_pow2(F y, F n) { return _mm512_scalef_ps(y, n); }

  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F load(const BF16* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F loadn(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  static F loadn(const BF16* p, int64_t n) { return widen_bf16(_mm256_maskz_loadu_epi16(lanes(n), p)); }
  static F loadn(const Half* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p)); }
  static void storen(float* p, F x, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
  static void storen(BF16* p, F x, int64_t n) { _mm256_mask_storeu_epi16(p, lanes(n), _mm512_cvtepi32_epi16(bf16_bits(x))); }
  static void storen(Half* p, F x, int64_t n) { _mm256_mask_storeu_epi16(p, lanes(n), to_half(x)); }

  template <typename T> static F round_to(F x) {
    if constexpr (std::is_same_v<T, BF16>) return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(x), 16));
    else if constexpr (std::is_same_v<T, Half>) return _mm512_cvtph_ps(to_half(x));
    else return x;
  }

 private:
  static F widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static __m256i to_half(F x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // fp32 -> bf16 bits in each 32-bit lane, round to nearest even (c10::BFloat16's rounding; NaN stays NaN).
  static __m512i bf16_bits(F x) {
    const __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  }
};
#else
// The same ops on AVX2 + FMA + F16C. AVX2 has no masked 16-bit loads or stores: partial rows go
// through a small buffer.
struct V {
  using F = __m256;
  static constexpr int N = 8;
  static __m256i lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, N))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static float reduce_add(F x) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static float reduce_max(F x) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
  static F max_first(F top, F x, int64_t n) { return _mm256_blendv_ps(top, _mm256_max_ps(top, x), mask(n)); }
  static F add_first(F total, F x, int64_t n) { return _mm256_add_ps(total, _mm256_and_ps(x, mask(n))); }
  static F round_nearest(F x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // y * 2^n for integral n in [-126, 127]: n goes straight into the exponent field.
  static F scale_by_pow2(F y, F n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }

  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F load(const BF16* p) { return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F loadn(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes(n)); }
  template <typename T> static F loadn(const T* p, int64_t n) {
    if (n >= N) return load(p);
    T buf[N] = {};
    std::memcpy(buf, p, n * sizeof(T));
    return load(buf);
  }
  static void storen(float* p, F x, int64_t n) { _mm256_maskstore_ps(p, lanes(n), x); }
  static void storen(BF16* p, F x, int64_t n) { store16(p, bf16_bits(x), n); }
  static void storen(Half* p, F x, int64_t n) { store16(p, to_half(x), n); }

  template <typename T> static F round_to(F x) {
    if constexpr (std::is_same_v<T, BF16>) return widen_bf16(bf16_bits(x));
    else if constexpr (std::is_same_v<T, Half>) return _mm256_cvtph_ps(to_half(x));
    else return x;
  }

 private:
  static F mask(int64_t n) { return _mm256_castsi256_ps(lanes(n)); }
  static F widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static __m128i to_half(F x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // fp32 -> 8 bf16, round to nearest even (c10::BFloat16's rounding; NaN stays NaN).
  static __m128i bf16_bits(F x) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    // 32 -> 16 bits: packus works within 128-bit halves; the permute puts the halves' results together.
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
  }
  template <typename T> static void store16(T* p, __m128i bits, int64_t n) {
    if (n >= N) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
      return;
    }
    T buf[N];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf), bits);
    std::memcpy(p, buf, n * sizeof(T));
  }
};
#endif

// exp for x <= 0 (Cephes' expf: a degree-5 polynomial on x - n ln2, then 2^n), ~1 ulp like SDPA's.
inline V::F exp_nonpositive(V::F x) {
  x = V::max(x, V::set1(-87.3f));
  const V::F n = V::round_nearest(V::mul(x, V::set1(1.44269504088896341f)));
  V::F r = V::fnmadd(n, V::set1(0.693359375f), x);
  r = V::fnmadd(n, V::set1(-2.12194440e-4f), r);
  V::F y = V::set1(1.9875691500e-4f);
  y = V::fmadd(y, r, V::set1(1.3981999507e-3f));
  y = V::fmadd(y, r, V::set1(8.3334519073e-3f));
  y = V::fmadd(y, r, V::set1(4.1665795894e-2f));
  y = V::fmadd(y, r, V::set1(1.6666665459e-1f));
  y = V::fmadd(y, r, V::set1(5.0000001201e-1f));
  y = V::fmadd(y, V::mul(r, r), V::add(r, V::set1(1.f)));
  return V::scale_by_pow2(y, n);
}

inline void softmax(float* s, int64_t n) {
  V::F top = V::set1(-INFINITY);
  for (int64_t t = 0; t < n; t += V::N) top = V::max_first(top, V::loadn(s + t, n - t), n - t);
  const V::F m = V::set1(V::reduce_max(top));
  V::F total = V::zero();
  for (int64_t t = 0; t < n; t += V::N) {
    const V::F e = exp_nonpositive(V::sub(V::loadn(s + t, n - t), m));
    V::storen(s + t, e, n - t);
    total = V::add_first(total, e, n - t);
  }
  const V::F inv = V::set1(1.f / V::reduce_add(total));
  for (int64_t t = 0; t < n; t += V::N) V::storen(s + t, V::mul(V::loadn(s + t, n - t), inv), n - t);
}
#else
inline void softmax(float* s, int64_t n) {
  const float top = *std::max_element(s, s + n);
  float total = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - top);
    total += s[t];
  }
  const float inv = 1.f / total;
  for (int64_t t = 0; t < n; ++t) s[t] *= inv;
}
#endif

// q . k over dim lanes. D > 0 is dim known at compile time (the loops then unroll).
template <typename T, int D>
inline float score(const float* q, const T* k, int dim) {
  if (D) dim = D;
#if defined(LB_AVX512) || defined(LB_AVX2)
  if (dim % V::N == 0) {
    V::F acc = V::zero();
    for (int j = 0; j < dim; j += V::N) acc = V::fmadd(V::load(q + j), V::load(k + j), acc);
    return V::reduce_add(acc);
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
#if defined(LB_AVX512) || defined(LB_AVX2)
  if (dim % V::N == 0) {
    V::F acc[kMaxDim / V::N];
    for (int j = 0; j < dim / V::N; ++j) acc[j] = V::zero();
    for (int64_t t = 0; t < n; ++t) {
      const V::F w = V::set1(p[t]);
      for (int j = 0; j < dim / V::N; ++j) acc[j] = V::fmadd(w, V::load(v + t * stride + V::N * j), acc[j]);
    }
    for (int j = 0; j < dim / V::N; ++j) V::store(out + V::N * j, acc[j]);
    return;
  }
#endif
  std::fill(out, out + dim, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int i = 0; i < dim; ++i) out[i] += p[t] * widen(v[t * stride + i]);
}

// A decode step reads each layer's cache cold (the other layers and the weights evict it); the
// hardware prefetcher ramps up too slowly over one slot's few-KB rows, so we prefetch ahead ourselves.
constexpr int64_t kPrefetchRows = 8;

template <typename T>
inline void prefetch_row(const T* row, int dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < static_cast<int64_t>(dim * sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

// One (slot, kv head): the `rep` query heads that share it, over positions [start, length).
template <typename T, int D>
void attend(const float* q, const T* k, const T* v, float* out, int64_t rep, int64_t start, int64_t length,
            int64_t stride, int dim, float scale, std::vector<float>& scores) {
  const int64_t n = length - start;
  scores.resize(n);
  float* s = scores.data();
  for (int64_t r = 0; r < rep; ++r) {
    for (int64_t t = 0; t < n; ++t) {
      if (r == 0) {  // the rows come from memory, cold: ask early (keys ahead, values for later)
        prefetch_row(k + (start + t + kPrefetchRows) * stride, dim);
        prefetch_row(v + (start + t) * stride, dim);
      }
      s[t] = score<T, D>(q + r * dim, k + (start + t) * stride, dim) * scale;
    }
    softmax(s, n);
    weighted_sum<T, D>(s, v + start * stride, n, stride, out + r * dim, dim);
  }
}

// ---- RMSNorm and rope, rounding where transformers' eager code rounds ----------------------------

// LlamaRMSNorm: y = (x * rsqrt(mean(x^2) + eps)).to(T); out = weight * y.
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t h, float eps) {
#if defined(LB_AVX512) || defined(LB_AVX2)
  V::F acc = V::zero();
  for (int64_t i = 0; i < h; i += V::N) {
    const V::F v = V::loadn(x + i, h - i);
    acc = V::fmadd(v, v, acc);
  }
  const float r = 1.f / std::sqrt(V::reduce_add(acc) / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; i += V::N) {
    const V::F y = V::round_to<T>(V::mul(V::loadn(x + i, h - i), V::set1(r)));
    V::storen(out + i, V::mul(V::loadn(w + i, h - i), y), h - i);
  }
#else
  float sum = 0.f;
  for (int64_t i = 0; i < h; ++i) sum += widen(x[i]) * widen(x[i]);
  const float r = 1.f / std::sqrt(sum / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; ++i) out[i] = static_cast<T>(widen(w[i]) * round_to<T>(widen(x[i]) * r));
#endif
}

// apply_rotary_pos_emb on one head: out = x * cos + rotate_half(x) * sin, rounded per op.
template <typename T>
void rope_head(const T* x, const T* c, const T* s, T* out, int64_t d) {
  const int64_t half = d / 2;
#if defined(LB_AVX512) || defined(LB_AVX2)
  for (int64_t i = 0; i < half; i += V::N) {
    const int64_t n = half - i;
    const V::F a = V::loadn(x + i, n), b = V::loadn(x + half + i, n);
    const V::F lo = V::add(V::round_to<T>(V::mul(a, V::loadn(c + i, n))),
                           V::round_to<T>(V::sub(V::zero(), V::mul(b, V::loadn(s + i, n)))));
    const V::F hi = V::add(V::round_to<T>(V::mul(b, V::loadn(c + half + i, n))),
                           V::round_to<T>(V::mul(a, V::loadn(s + half + i, n))));
    V::storen(out + i, lo, n);
    V::storen(out + half + i, hi, n);
  }
#else
  for (int64_t i = 0; i < half; ++i) {
    const float a = widen(x[i]), b = widen(x[half + i]);
    out[i] = static_cast<T>(round_to<T>(a * widen(c[i])) + round_to<T>(-(b * widen(s[i]))));
    out[half + i] = static_cast<T>(round_to<T>(b * widen(c[half + i])) + round_to<T>(a * widen(s[half + i])));
  }
#endif
}

template <typename F>
void dispatch(at::ScalarType type, const char* op, const F& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": dtype ", type);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.dim() == 1 && weight.size(0) == x.size(1) &&
              weight.scalar_type() == x.scalar_type(), "rms_norm: x [rows, hidden], weight [hidden] of its dtype");
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), h = x.size(1);
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / h), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) rms_norm_row(xp + r * x.stride(0), w.data_ptr<T>(), op + r * h, h, eps);
    });
  });
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "rope: x [batch, seq, heads, even head_dim]");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(2) == x.size(3) &&
              cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: cos/sin [batch or 1, seq, head_dim] of x's dtype");
  const at::Tensor c = cos.expand({x.size(0), x.size(1), x.size(3)}).contiguous();
  const at::Tensor s = sin.expand({x.size(0), x.size(1), x.size(3)}).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t seq = x.size(1), heads = x.size(2), d = x.size(3);
  dispatch(x.scalar_type(), "rope", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, x.size(0) * seq * heads, std::max<int64_t>(1, 16384 / d), [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t row = task / heads, h = task % heads, i = row / seq, j = row % seq;
        rope_head(xp + i * x.stride(0) + j * x.stride(1) + h * x.stride(2), c.data_ptr<T>() + row * d,
                  s.data_ptr<T>() + row * d, op + task * d, d);
      }
    });
  });
  return out;
}

// q [n, 1, heads, dim], k, v [n, 1, kv_heads, dim]: the step's projections (rope not yet applied
// when cos/sin [n, 1, dim] are given). keys/values [slots >= n, kv_heads, max_len, dim]: one layer of
// the cache, where k, v are written at position lengths[i] - 1 first; slot i then attends to its
// positions [max(0, lengths[i] - sliding_window), lengths[i]). -> [n, 1, heads * dim] in q's dtype.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& keys,
                            at::Tensor& values, const at::Tensor& lengths, int64_t sliding_window, double scale,
                            const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(1) == 1 && k_in.dim() == 4 && v_in.dim() == 4, "decode_attention: q/k/v ranks");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode_attention: cos and sin together");
  const at::Tensor q = (cos ? rope(q_in, *cos, *sin) : q_in).select(1, 0);
  const at::Tensor k = (cos ? rope(k_in, *cos, *sin) : k_in).select(1, 0), v = v_in.select(1, 0);
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(), "decode_attention: bad ranks");
  TORCH_CHECK(keys.stride(3) == 1 && values.strides() == keys.strides(), "decode_attention: cache layout");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "decode_attention: key/value dtypes differ");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = keys.size(1);
  TORCH_CHECK(keys.size(0) >= n && keys.size(3) == dim && heads % kv_heads == 0, "decode_attention: shapes");
  TORCH_CHECK(dim <= kMaxDim, "decode_attention: head_dim ", dim);
  TORCH_CHECK(k.dim() == 3 && k.size(0) == n && k.size(1) == kv_heads && k.size(2) == dim && v.sizes() == k.sizes(),
              "decode_attention: new keys/values");
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor kn = k.to(keys.scalar_type()).contiguous(), vn = v.to(keys.scalar_type()).contiguous();
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
    scalar_t* kp = keys.data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    const scalar_t* knp = kn.data_ptr<scalar_t>();
    const scalar_t* vnp = vn.data_ptr<scalar_t>();
    at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / kv_heads, g = task % kv_heads;
        const int64_t length = lp[i];
        const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, length - sliding_window) : 0;
        const int64_t base = i * keys.stride(0) + g * keys.stride(1);
        const int64_t head = (i * heads + g * rep) * dim;
        const int64_t at = base + (length - 1) * keys.stride(2);
        std::copy(knp + task * dim, knp + (task + 1) * dim, kp + at);
        std::copy(vnp + task * dim, vnp + (task + 1) * dim, vp + at);
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
  return out.to(q.scalar_type()).view({n, 1, heads * dim});
}

std::string vector_path() {
#if defined(LB_AVX512)
  return "avx512";
#elif defined(LB_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

LB_LIBRARY(LB_NAMESPACE, m) {
  m.def("vector_path() -> str");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor lengths, "
        "int sliding_window, float scale, Tensor? cos, Tensor? sin) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

LB_LIBRARY_IMPL(LB_NAMESPACE, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
}

// No tensor arguments to dispatch on: the build's vector path is registered for every backend.
LB_LIBRARY_IMPL(LB_NAMESPACE, CompositeExplicitAutograd, m) { m.impl("vector_path", &vector_path); }
