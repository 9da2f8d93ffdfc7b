// Paged attention on CPU that reads K/V blocks where they lie in the cache (paged_kernel.py builds
// and loads this file). Each query row attends to the first `context_lens[row]` tokens of its
// sequence, found through that sequence's block table: a decode row sees its whole context, a
// prefill row the context up to its own position (causal). Work is one (query row, KV head) pair
// at a time, so a long context costs its own reads only, never padding for the others.
//
// Per pair, the G query heads that share the KV head walk the context one block at a time with an
// online softmax (running max and sum, rescaled once per block), accumulating in float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using conserve_kernels::exp_minus_max;
using conserve_kernels::to_float;

// The block's rows as float32: widened once per block (not once per query head that reads them);
// float caches are used in place.
template <typename T>
inline const float* block_as_float(const T* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float(src, buffer, n);
    return buffer;
  }
}

// HEAD_DIM > 0 fixes the head size at compile time (fully unrolled vector loops); 0 reads it from d.
template <typename T, int HEAD_DIM>
void attend(const T* q, const T* k_cache, const T* v_cache, const int32_t* tables, const int32_t* seq_ids,
            const int32_t* context_lens, T* out, int64_t rows, int64_t heads, int64_t kv_heads, int64_t d_any,
            int64_t slots, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t d = HEAD_DIM > 0 ? HEAD_DIM : d_any;
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), acc(group * d), kbuf(block_size * d), vbuf(block_size * d);
    std::vector<float> scores(group * block_size), run_max(group), run_sum(group);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / kv_heads, h = unit % kv_heads;
      const T* qr = q + (r * heads + h * group) * d;
      to_float(qr, qf.data(), group * d);
      for (int64_t i = 0; i < group * d; ++i) qf[i] *= scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      const int32_t* table = tables + static_cast<int64_t>(seq_ids[r]) * max_blocks;
      const int64_t n = context_lens[r];
      const T* k_head = k_cache + h * slots * d;
      const T* v_head = v_cache + h * slots * d;
      for (int64_t start = 0; start < n; start += block_size) {
        const int64_t count = std::min(block_size, n - start);
        // A block's slots are consecutive: its K (and V) rows are one contiguous [count, d] run.
        const int64_t base = static_cast<int64_t>(table[start / block_size]) * block_size * d;
        if (start + block_size < n) {  // blocks lie apart: ask for the next one while this one is used
          const int64_t next = static_cast<int64_t>(table[start / block_size + 1]) * block_size * d;
          const int64_t bytes = std::min(block_size, n - start - block_size) * d * sizeof(T);
          for (int64_t off = 0; off < bytes; off += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(k_head + next) + off);
            __builtin_prefetch(reinterpret_cast<const char*>(v_head + next) + off);
          }
        }
        const float* kb = block_as_float(k_head + base, kbuf.data(), count * d);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * d;
          float* s = scores.data() + g * block_size;
          for (int64_t j = 0; j < count; ++j) {
            const float* kr = kb + j * d;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += qg[i] * kr[i];
            s[j] = dot;
          }
          const float block_max = *std::max_element(s, s + count);
          const float new_max = std::max(run_max[g], block_max);
          const float rescale = std::exp(run_max[g] - new_max);  // 0 on the first block (max was -inf)
          run_sum[g] = run_sum[g] * rescale + exp_minus_max(s, count, new_max);
          run_max[g] = new_max;
          if (rescale != 1.f) {
            float* a = acc.data() + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) a[i] *= rescale;
          }
        }
        const float* vb = block_as_float(v_head + base, vbuf.data(), count * d);
        for (int64_t g = 0; g < group; ++g) {
          const float* s = scores.data() + g * block_size;
          float* a = acc.data() + g * d;
          for (int64_t j = 0; j < count; ++j) {
            const float p = s[j];
            const float* vr = vb + j * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) a[i] += p * vr[i];
          }
        }
      }
      T* o = out + (r * heads + h * group) * d;
      for (int64_t g = 0; g < group; ++g) {
        const float inv = run_sum[g] > 0.f ? 1.f / run_sum[g] : 0.f;
        for (int64_t i = 0; i < d; ++i) o[g * d + i] = static_cast<T>(acc[g * d + i] * inv);
      }
    }
  });
}

// q: [rows, heads, d]; k_cache, v_cache: [kv_heads, slots, d]; block_tables: [seqs, max_blocks] int32;
// seq_ids, context_lens: [rows] int32. Returns [rows, heads, d].
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_ids,
                           const at::Tensor& context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and the cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_ids.scalar_type() == at::kInt &&
                  context_lens.scalar_type() == at::kInt, "index tensors must be int32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the cache must be contiguous");
  const auto qc = q.contiguous();
  const auto tables = block_tables.contiguous();
  const int64_t rows = qc.size(0), heads = qc.size(1), d = qc.size(2);
  const int64_t kv_heads = k_cache.size(0), slots = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == d && heads % kv_heads == 0, "head shapes do not match");
  TORCH_CHECK(seq_ids.numel() == rows && context_lens.numel() == rows, "one seq id and length per row");
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto kernel) {
      kernel(qc.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), v_cache.const_data_ptr<scalar_t>(),
             tables.const_data_ptr<int32_t>(), seq_ids.const_data_ptr<int32_t>(),
             context_lens.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), rows, heads, kv_heads, d,
             slots, block_size, tables.size(1), static_cast<float>(scale));
    };
    if (d == 64) {
      run(attend<scalar_t, 64>);
    } else if (d == 128) {
      run(attend<scalar_t, 128>);
    } else {
      run(attend<scalar_t, 0>);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(conserve, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_ids, "
        "Tensor context_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(conserve, CPU, m) { m.impl("paged_attention", &paged_attention); }
