// Fused element-wise steps of a decoder layer on CPU (layer_ops.py builds and loads this file). Eager
// PyTorch runs the rotary embedding as 7 passes over q and k (4 multiplies, a subtract, an add and a
// concatenation), rounding to the model's dtype after each; this reads and writes them once, in place,
// computing in float32. The residual adds fold into the norms that follow them, and SiLU-gating is one
// pass (in AVX-512 intrinsics: GCC 12 leaves a scalar-written exp loop scalar, 5-10x slower than
// torch's; without AVX-512 the op calls torch's silu and multiply).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "kernel_common.h"


namespace {

using conserve_kernels::narrow;
using conserve_kernels::widen;

// Rotate-half rotary embedding in place: for each head, dimension i pairs with i + D/2:
//   (a, b) -> (a cos - b sin, b cos + a sin), with cos/sin of the row's position.
template <typename T>
void rotate_rows(T* x, const float* cos, const float* sin, int64_t rows, int64_t heads, int64_t d,
                 int64_t row_stride, int64_t head_stride) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cos + r * half;
      const float* s = sin + r * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* a = x + r * row_stride + h * head_stride;
        T* b = a + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float fa = widen(a[i]), fb = widen(b[i]);
          a[i] = narrow<T>(fa * c[i] - fb * s[i]);
          b[i] = narrow<T>(fb * c[i] + fa * s[i]);
        }
      }
    }
  });
}

// x: [T, heads, D] (head dimension contiguous, any row and head strides), rotated in place;
// cos, sin: [T, D/2] float32, the rows' positions already looked up.
void rotary_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rotary_: x must be [T, heads, D], D dense");
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == rows * d / 2 && sin.numel() == rows * d / 2,
              "rotary_: cos and sin must be contiguous float32 [T, D/2]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    rotate_rows(x.mutable_data_ptr<scalar_t>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), rows,
                heads, d, x.stride(0), x.stride(1));
  });
}

// RMS norm of float32 rows, scaled by a float32 weight, written in the model's dtype: eager torch runs
// it as ~8 ops (pow, mean, add, rsqrt, mul, mul, cast), each ~2-5 us on a single token's row, twice a layer.
template <typename T>
void rms_norm_rows(const float* x, const float* w, T* out, int64_t rows, int64_t width, int64_t stride, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * stride;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += row[i] * row[i];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
      T* dst = out + r * width;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        uint16_t* bits_out = reinterpret_cast<uint16_t*>(dst);  // round on the bits: this loop vectorises
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const float y = row[i] * inv * w[i];
          uint32_t bits;
          std::memcpy(&bits, &y, sizeof bits);
          bits_out[i] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        }
      } else {
        for (int64_t i = 0; i < width; ++i) dst[i] = static_cast<T>(row[i] * inv * w[i]);
      }
    }
  });
}

// x: [T, H] float32 (rows dense), weight: [H] float32. Returns [T, H] in `dtype`.
at::Tensor rms_norm_to(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "rms_norm_to: x must be float32 [T, H]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm_to: weight must be contiguous float32 [H]");
  auto out = at::empty({x.size(0), x.size(1)}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rms_norm_to", [&] {
    rms_norm_rows(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(),
                  x.size(0), x.size(1), x.stride(0), static_cast<float>(eps));
  });
  return out;
}

// out = h + y (float32) and its RMS norm in `dtype`: the residual add and the norm after it in one pass
// over each row, instead of a type-promoting add (~20 us at 32 rows) then the norm.
template <typename T, typename Y>
void add_rms_norm_rows(const float* h, const Y* y, const float* w, float* sum, T* out, int64_t rows, int64_t width,
                       int64_t h_stride, int64_t y_stride, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* hr = h + r * h_stride;
      const Y* yr = y + r * y_stride;
      float* sr = sum + r * width;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) {
        sr[i] = hr[i] + widen(yr[i]);
        squares += sr[i] * sr[i];
      }
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
      T* dst = out + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) dst[i] = narrow<T>(sr[i] * inv * w[i]);
    }
  });
}

// h: [T, H] float32, y: [T, H] (rows dense, any float dtype), weight: [H] float32.
// Returns (h + y as float32, its RMS norm in `dtype`).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& h, const at::Tensor& y, const at::Tensor& weight,
                                                double eps, at::ScalarType dtype) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.stride(1) == 1, "add_rms_norm: h must be float32 [T, H]");
  TORCH_CHECK(y.dim() == 2 && y.sizes() == h.sizes() && y.stride(1) == 1, "add_rms_norm: y must be [T, H] like h");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == h.size(1),
              "add_rms_norm: weight must be contiguous float32 [H]");
  auto sum = at::empty({h.size(0), h.size(1)}, h.options());
  auto out = at::empty({h.size(0), h.size(1)}, h.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "add_rms_norm", [&] {
    using Y = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "add_rms_norm_out", [&] {
      add_rms_norm_rows(h.const_data_ptr<float>(), y.const_data_ptr<Y>(), weight.const_data_ptr<float>(),
                        sum.mutable_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), h.size(0), h.size(1),
                        h.stride(0), y.stride(0), static_cast<float>(eps));
    });
  });
  return {sum, out};
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {  // round to nearest even, as narrow()
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(rounded));
}

// silu(g) * u, 16 lanes at a time (kernel_common's silu16).
template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t rows, int64_t inter, int64_t stride) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * stride;
      const T* up = gate + inter;
      T* dst = out + r * inter;
      for (int64_t i = 0; i < inter; i += 16) {
        const __mmask16 m = conserve_kernels::first_lanes(inter - i);
        const __m512 g = load16(gate + i, m), u = load16(up + i, m);
        store16(dst + i, _mm512_mul_ps(conserve_kernels::silu16(g), u), m);
      }
    }
  });
}
#endif

// x: [T, 2I] (gate then up, rows dense). Returns silu(gate) * up as [T, I] in x's dtype.
at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "silu_mul: x must be [T, 2I], rows dense");
  const int64_t inter = x.size(1) / 2;
#if defined(__AVX512F__)
  if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) {
    auto out = at::empty({x.size(0), inter}, x.options());
    if (x.scalar_type() == at::kFloat) {
      silu_mul_rows(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), x.size(0), inter, x.stride(0));
    } else {
      silu_mul_rows(x.const_data_ptr<c10::BFloat16>(), out.mutable_data_ptr<c10::BFloat16>(), x.size(0), inter,
                    x.stride(0));
    }
    return out;
  }
#endif
  return at::mul(at::silu(x.narrow(1, 0, inter)), x.narrow(1, inter, inter));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conserve, m) {
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("rms_norm_to(Tensor x, Tensor weight, float eps, ScalarType dtype) -> Tensor");
  m.def("add_rms_norm(Tensor h, Tensor y, Tensor weight, float eps, ScalarType dtype) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(conserve, CPU, m) {
  m.impl("rotary_", &rotary_);
  m.impl("rms_norm_to", &rms_norm_to);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
}
