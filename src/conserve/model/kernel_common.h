// Helpers shared by conserve's CPU attention kernels (paged_attention.cpp, prefill_attention.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace conserve_kernels {

template <typename T>
inline float widen(T x) {
  return static_cast<float>(x);
}

template <>
inline float widen(c10::BFloat16 x) {  // the upper half of a float: a shift the compiler vectorises
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float32 -> T; for bfloat16 round-to-nearest-even on the bits, which vectorises (c10's conversion
// checks for NaN in a branch, which does not). Callers pass finite values.
template <typename T>
inline T narrow(float x) {
  return static_cast<T>(x);
}

template <>
inline c10::BFloat16 narrow(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return c10::BFloat16(static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16),
                       c10::BFloat16::from_bits());
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}

// exp(x) for x <= 0 (scores minus their running max) in plain arithmetic, so a `#pragma omp simd`
// loop over a block's scores vectorises (std::exp is a scalar call). 2^(x log2 e): the integer part
// goes into the exponent bits, the fraction through a degree-5 polynomial fitted to 2^f on [0, 1)
// (relative error < 1e-7, below float32 rounding).
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 0.0018762329f;
  p = p * f + 0.0089925840f;
  p = p * f + 0.0558236045f;
  p = p * f + 0.2401545299f;
  p = p * f + 0.6931529682f;
  p = p * f + 0.9999999269f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(whole) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#if defined(__AVX512F__)
// exp_nonpositive (kernel_common.h) for 16 lanes; vscalefps applies the power of two.
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);
  __m512 p = _mm512_set1_ps(0.0018762329f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0089925840f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0558236045f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2401545299f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931529682f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999999269f));
  return _mm512_scalef_ps(p, whole);
}

inline __mmask16 first_lanes(int64_t n) {  // lanes 0 .. n-1 of 16
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// silu(g) = g * sigmoid(g), with sigmoid from e = exp(-|g|) <= 1 (no overflow either side).
inline __m512 silu16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  const __m512 e = exp_nonpositive16(_mm512_sub_ps(zero, _mm512_abs_ps(g)));
  const __mmask16 positive = _mm512_cmp_ps_mask(g, zero, _CMP_GE_OQ);
  return _mm512_mul_ps(g, _mm512_div_ps(_mm512_mask_mov_ps(e, positive, one), _mm512_add_ps(one, e)));
}

// x[0:n] = exp(x[0:n] - max) in place (every x <= max); returns their sum. GCC leaves the scalar
// exp_nonpositive loop unvectorised, so this is written in AVX-512 intrinsics.
inline float exp_minus_max(float* x, int64_t n, float max) {
  const __m512 vmax = _mm512_set1_ps(max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + j), vmax));
    _mm512_mask_storeu_ps(x + j, lanes, e);
    sum = _mm512_mask_add_ps(sum, lanes, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}
#else
inline float exp_minus_max(float* x, int64_t n, float max) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - max);
    sum += x[j];
  }
  return sum;
}
#endif

}  // namespace conserve_kernels
