// Row-wise reductions over float32 logits on CPU (logits_ops.py builds and loads this file). torch's
// CPU argmax and topk over a [32, 49152] block take ~0.45 and ~0.5 ms (amax alone: 0.04 ms): they
// track indices in scalar code. Here one vectorised pass per row does each.
//
//   argmax_rows(x)       the first index of each row's largest value, as torch.argmax (a NaN counts as
//                        the largest, so a row with a NaN gives its first NaN's index)
//   top_indices(x, k)    the indices of each row's k largest values, largest first (ties: any of them;
//                        NaN is skipped; a row with fewer than k values above -inf repeats indices)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "kernel_common.h"


namespace {

int64_t first_nan(const float* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(row[j])) return j;
  return -1;
}

// Two passes: the row's max (a vmaxps per 16 values, four chains), then the first index holding it.
// Tracking indices in the first pass costs several instructions per vector: measured 2.5x slower.
int64_t argmax_row(const float* row, int64_t n) {
#if defined(__AVX512F__)
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  __mmask16 nan = 0;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    const __m512 a = _mm512_loadu_ps(row + j), b = _mm512_loadu_ps(row + j + 16);
    const __m512 c = _mm512_loadu_ps(row + j + 32), d = _mm512_loadu_ps(row + j + 48);
    m0 = _mm512_max_ps(m0, a), m1 = _mm512_max_ps(m1, b), m2 = _mm512_max_ps(m2, c), m3 = _mm512_max_ps(m3, d);
    // A NaN in any of them makes a lane of the sums NaN: one test for four vectors (inf + -inf too,
    // a false alarm that first_nan settles).
    nan |= _mm512_cmp_ps_mask(_mm512_add_ps(a, b), _mm512_add_ps(c, d), _CMP_UNORD_Q);
  }
  for (; j < n; j += 16) {
    const __mmask16 lanes = conserve_kernels::first_lanes(n - j);
    const __m512 v = _mm512_mask_loadu_ps(lowest, lanes, row + j);
    m0 = _mm512_max_ps(m0, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  if (nan) {
    const int64_t at = first_nan(row, n);
    if (at >= 0) return at;
  }
  const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  const __m512 target = _mm512_set1_ps(top);
  for (j = 0; j < n; j += 16) {
    const __mmask16 lanes = conserve_kernels::first_lanes(n - j);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, row + j), target, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  return 0;  // not reached: the max is in the row
#else
  int64_t best_at = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(row[j])) return j;
    if (row[j] > row[best_at]) best_at = j;
  }
  return best_at;
#endif
}

// The k best (value, index) pairs of a row, kept sorted ascending so kept[0] is the bar to pass; most
// vectors of a row have no lane above it, so the scan is a compare per 16 values.
void top_row(const float* row, int64_t n, int64_t k, int64_t* out) {
  std::vector<std::pair<float, int64_t>> kept;
  for (int64_t j = 0; j < k; ++j) kept.emplace_back(-std::numeric_limits<float>::infinity(), j);
  auto offer = [&](int64_t j) {
    if (!(row[j] > kept.front().first)) return;
    kept.front() = {row[j], j};
    for (size_t i = 0; i + 1 < kept.size() && kept[i].first > kept[i + 1].first; ++i) std::swap(kept[i], kept[i + 1]);
  };
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) {
    __mmask16 above = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), _mm512_set1_ps(kept.front().first), _CMP_GT_OQ);
    while (above) {
      offer(j + __builtin_ctz(above));
      above &= above - 1;
    }
  }
#endif
  for (; j < n; ++j) offer(j);
  for (int64_t i = 0; i < static_cast<int64_t>(kept.size()); ++i) out[i] = kept[kept.size() - 1 - i].second;
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              name, ": expects float32 [N, V] with contiguous rows");
}

at::Tensor argmax_rows(const at::Tensor& x) {
  check_rows(x, "argmax_rows");
  TORCH_CHECK(x.size(1) > 0, "argmax_rows: empty rows");
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* base = x.const_data_ptr<float>();
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  const int64_t n = x.size(1), stride = x.stride(0);
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) dst[r] = argmax_row(base + r * stride, n);
  });
  return out;
}

at::Tensor top_indices(const at::Tensor& x, int64_t k) {
  check_rows(x, "top_indices");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "top_indices: k must be in 1 .. the row length");
  auto out = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  const float* base = x.const_data_ptr<float>();
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  const int64_t n = x.size(1), stride = x.stride(0);
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) top_row(base + r * stride, n, k, dst + r * k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conserve, m) {
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("top_indices(Tensor x, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(conserve, CPU, m) {
  m.impl("argmax_rows", &argmax_rows);
  m.impl("top_indices", &top_indices);
}
