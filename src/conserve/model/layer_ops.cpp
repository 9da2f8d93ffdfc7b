// Fused element-wise steps of a decoder layer on CPU (layer_ops.py builds and loads this file). Eager
// PyTorch runs the rotary embedding as 7 passes over q and k (4 multiplies, a subtract, an add and a
// concatenation), rounding to the model's dtype after each; this reads and writes them once, in place,
// computing in float32. (A fused SiLU-gating was tried and dropped: GCC 12 left its exp loop scalar,
// 5-10x slower than torch's vectorised silu and multiply.)

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(conserve, m) {
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("rms_norm_to(Tensor x, Tensor weight, float eps, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(conserve, CPU, m) {
  m.impl("rotary_", &rotary_);
  m.impl("rms_norm_to", &rms_norm_to);
}
