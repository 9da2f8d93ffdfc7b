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

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// bfloat16 on CPUs with AVX512-BF16: both products on vdpbf16ps, reading the cache's bf16 rows as they
// lie (no widening to float32). Measured on Zen5 for 32 decodes of ~108 tokens: the float32 loop above
// spent ~2000 cycles a block on 48 horizontal dot products and 48 row updates, bound by instructions.
//
//   scores: a key row and a query head's row are both D bf16, so vdpbf16ps gives 16 partial sums per
//           (head, key); the 16 keys' partial sums are reduced together in a transpose tree (45
//           instructions for 16 dot products instead of ~8 each).
//   P . V:  two key rows interleaved (vpunpck{l,h}wd) form bf16 pairs per head dimension, multiplied
//           by the pair of their probabilities; the interleave permutes the dimensions inside each
//           128-bit lane, undone once when the unit is written out.
// Probabilities are rounded to bf16 for P . V (the sum uses the rounded values), as in the prefill
// kernel. Keys past a sequence's length are never read into P . V: a partial block's missing rows
// are zero, so stale or NaN slots cannot leak in.
#include <immintrin.h>

using conserve_kernels::exp_nonpositive16;
using conserve_kernels::first_lanes;

constexpr int64_t kMaxGroup = 8;  // query heads per KV head on this path; larger groups take the float path

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// r[j] = the sum of v[j]'s 16 lanes, for 16 vectors: pairwise shuffles and adds, halving the vectors
// each level while each register carries partial sums of more of them.
inline __m512 reduce16(__m512* v) {
  __m512 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k)
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d c = _mm512_castps_pd(w[2 * k]), d = _mm512_castps_pd(w[2 * k + 1]);
    x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  for (int k = 0; k < 2; ++k)
    y[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

// D / 32 vectors of 32 bf16 make one row.
template <int64_t D>
inline void load_row(const c10::BFloat16* src, __m512i* dst) {
  for (int64_t c = 0; c < D / 32; ++c) dst[c] = _mm512_loadu_si512(src + 32 * c);
}

template <int64_t D>
void attend_bf16(const c10::BFloat16* q, const c10::BFloat16* k_cache, const c10::BFloat16* v_cache,
                 const int32_t* tables, const int32_t* seq_ids, const int32_t* context_lens, c10::BFloat16* out,
                 int64_t rows, int64_t heads, int64_t kv_heads, int64_t slots, int64_t block_size,
                 int64_t max_blocks, float scale) {
  constexpr int64_t C = D / 32;  // bf16 vectors per row
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    __m512i qv[kMaxGroup][C];
    __m512 acc[kMaxGroup][2 * C];  // [lo, hi] per chunk c: the interleaved dimension order
    float run_max[kMaxGroup], run_sum[kMaxGroup];
    alignas(64) uint16_t probs[kMaxGroup][16];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / kv_heads, h = unit % kv_heads;
      for (int64_t g = 0; g < group; ++g) {
        load_row<D>(q + (r * heads + h * group + g) * D, qv[g]);
        for (int64_t c = 0; c < 2 * C; ++c) acc[g][c] = _mm512_setzero_ps();
        run_max[g] = -std::numeric_limits<float>::infinity();
        run_sum[g] = 0.f;
      }
      const int32_t* table = tables + static_cast<int64_t>(seq_ids[r]) * max_blocks;
      const int64_t n = context_lens[r];
      const c10::BFloat16* k_head = k_cache + h * slots * D;
      const c10::BFloat16* v_head = v_cache + h * slots * D;
      for (int64_t start = 0; start < n; start += 16) {
        const int64_t count = std::min<int64_t>(16, n - start);
        // 16 keys lie in one block: this path takes block sizes that are multiples of 16.
        const int64_t slot = static_cast<int64_t>(table[start / block_size]) * block_size + start % block_size;
        if (start % block_size + 16 >= block_size && start + 16 < n) {  // next block: ask for it early
          const int64_t next = static_cast<int64_t>(table[(start + 16) / block_size]) * block_size * D;
          const int64_t bytes = std::min<int64_t>(block_size, n - start - 16) * D * 2;
          for (int64_t off = 0; off < bytes; off += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(k_head + next) + off);
            __builtin_prefetch(reinterpret_cast<const char*>(v_head + next) + off);
          }
        }
        const c10::BFloat16* kb = k_head + slot * D;
        const c10::BFloat16* vb = v_head + slot * D;
        const __mmask16 live = first_lanes(count);
        for (int64_t g = 0; g < group; ++g) {
          __m512 parts[16];
          for (int64_t j = 0; j < 16; ++j) {
            parts[j] = _mm512_setzero_ps();
            if (j < count) {
              __m512i kr[C];
              load_row<D>(kb + j * D, kr);
              for (int64_t c = 0; c < C; ++c) parts[j] = dot_pairs(parts[j], qv[g][c], kr[c]);
            }
          }
          const __m512 s = _mm512_mul_ps(reduce16(parts), _mm512_set1_ps(scale));
          const float block_max = _mm512_mask_reduce_max_ps(live, s);
          const float new_max = std::max(run_max[g], block_max);
          const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive16(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
          const __m256bh b = _mm512_cvtneps_pbh(e);
          _mm256_store_si256(reinterpret_cast<__m256i*>(probs[g]), reinterpret_cast<const __m256i&>(b));
          const __m512 rounded =
              _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(b)), 16));
          const float rescale = conserve_kernels::exp_nonpositive(run_max[g] - new_max);  // 0 on the first block
          run_sum[g] = run_sum[g] * rescale + _mm512_reduce_add_ps(rounded);
          run_max[g] = new_max;
          if (rescale != 1.f) {
            const __m512 f = _mm512_set1_ps(rescale);
            for (int64_t c = 0; c < 2 * C; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], f);
          }
        }
        for (int64_t j = 0; j < count; j += 2) {
          __m512i a[C], b[C];
          load_row<D>(vb + j * D, a);
          if (j + 1 < count) {
            load_row<D>(vb + (j + 1) * D, b);
          } else {
            for (int64_t c = 0; c < C; ++c) b[c] = _mm512_setzero_si512();
          }
          __m512i lo[C], hi[C];
          for (int64_t c = 0; c < C; ++c) lo[c] = _mm512_unpacklo_epi16(a[c], b[c]), hi[c] = _mm512_unpackhi_epi16(a[c], b[c]);
          for (int64_t g = 0; g < group; ++g) {
            uint32_t pair;
            std::memcpy(&pair, probs[g] + j, sizeof pair);  // probs[g][count..15] are 0
            const __m512i p = _mm512_set1_epi32(static_cast<int32_t>(pair));
            for (int64_t c = 0; c < C; ++c) {
              acc[g][2 * c] = dot_pairs(acc[g][2 * c], p, lo[c]);
              acc[g][2 * c + 1] = dot_pairs(acc[g][2 * c + 1], p, hi[c]);
            }
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = run_sum[g] > 0.f ? 1.f / run_sum[g] : 0.f;
        alignas(64) float lanes[2 * C][16];
        for (int64_t c = 0; c < 2 * C; ++c) _mm512_store_ps(lanes[c], _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv)));
        c10::BFloat16* o = out + (r * heads + h * group + g) * D;
        // Lane 4L + m of chunk c's lo holds dimension 32c + 8L + m; of its hi, 32c + 8L + 4 + m.
        for (int64_t c = 0; c < C; ++c)
          for (int64_t lane = 0; lane < 16; ++lane) {
            const int64_t dim = 32 * c + 8 * (lane / 4) + lane % 4;
            o[dim] = conserve_kernels::narrow<c10::BFloat16>(lanes[2 * c][lane]);
            o[dim + 4] = conserve_kernels::narrow<c10::BFloat16>(lanes[2 * c + 1][lane]);
          }
      }
    }
  });
}

// Whether attend_bf16 takes this call.
inline bool bf16_path_fits(at::ScalarType dtype, int64_t d, int64_t group, int64_t block_size) {
  return dtype == at::kBFloat16 && (d == 64 || d == 128) && group <= kMaxGroup && block_size % 16 == 0;
}
#endif

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
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (bf16_path_fits(qc.scalar_type(), d, heads / kv_heads, block_size)) {
    auto kernel = d == 64 ? &attend_bf16<64> : &attend_bf16<128>;
    kernel(qc.const_data_ptr<c10::BFloat16>(), k_cache.const_data_ptr<c10::BFloat16>(),
           v_cache.const_data_ptr<c10::BFloat16>(), tables.const_data_ptr<int32_t>(), seq_ids.const_data_ptr<int32_t>(),
           context_lens.const_data_ptr<int32_t>(), out.mutable_data_ptr<c10::BFloat16>(), rows, heads, kv_heads, slots,
           block_size, tables.size(1), static_cast<float>(scale));
    return out;
  }
#endif
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
