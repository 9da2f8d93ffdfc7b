// Causal attention for one prefill chunk on CPU (prefill_kernel.py builds and loads this file).
//
// The chunk's T query rows are the last T positions of a context of `ctx` keys: row i attends to
// keys 0 .. ctx - T + i. Work is split into (KV head, tile of QUERY_TILE positions) units; a unit's
// G * QUERY_TILE query vectors (the G heads sharing the KV head, position-major) walk the keys one
// tile of KEY_TILE at a time with an online softmax, in float32 throughout:
//
//   scores = Q . K_tile^T   register-blocked: 4 query rows x 2 vectors of keys per step, K transposed
//   softmax update          running max and sum per row, the accumulator rescaled when the max moves
//   acc += P . V_tile       register-blocked: 4 query rows x 2 vectors of head dimensions
//
// torch's CPU flash attention was measured at ~110 GFLOP/s on a 1024-token SmolLM2 prompt (11 ms a
// layer, more than the layer's projections); these blocked loops keep the float32 FMA units busy.
// Tiles past a row's last key are skipped; units are interleaved long-with-short so the threads'
// shares of a causal triangle are even.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernel_common.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using conserve_kernels::exp_minus_max;
using conserve_kernels::exp_nonpositive;
using conserve_kernels::widen;

#if defined(__AVX512F__)
#define CONSERVE_LANES 16
#else
#define CONSERVE_LANES 8
#endif
constexpr int64_t kLanes = CONSERVE_LANES;
// One machine register of floats (GCC/Clang vector extension; lowered to AVX-512 or AVX2).
typedef float vfloat __attribute__((vector_size(CONSERVE_LANES * sizeof(float))));

constexpr int64_t QUERY_TILE = 32;  // positions per unit
constexpr int64_t KEY_TILE = 64;    // keys per softmax step; a multiple of 2 * kLanes, and of 64 (bf16 path)
constexpr int64_t ROW_BLOCK = 4;    // query rows per register block

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

inline vfloat splat(float x) { return vfloat{} + x; }

// s[m][0:KEY_TILE] = q[m][0:d] . kt[0:d][*] for ROW_BLOCK rows m.
template <int64_t D>
inline void score_block(const float* q, const float* kt, float* s) {
  for (int64_t jb = 0; jb < KEY_TILE; jb += 2 * kLanes) {
    vfloat a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
    for (int64_t i = 0; i < D; ++i) {
      const vfloat k0 = load(kt + i * KEY_TILE + jb), k1 = load(kt + i * KEY_TILE + jb + kLanes);
      const vfloat q0 = splat(q[i]), q1 = splat(q[D + i]), q2 = splat(q[2 * D + i]), q3 = splat(q[3 * D + i]);
      a00 += q0 * k0, a01 += q0 * k1, a10 += q1 * k0, a11 += q1 * k1;
      a20 += q2 * k0, a21 += q2 * k1, a30 += q3 * k0, a31 += q3 * k1;
    }
    store(s + jb, a00), store(s + jb + kLanes, a01);
    store(s + KEY_TILE + jb, a10), store(s + KEY_TILE + jb + kLanes, a11);
    store(s + 2 * KEY_TILE + jb, a20), store(s + 2 * KEY_TILE + jb + kLanes, a21);
    store(s + 3 * KEY_TILE + jb, a30), store(s + 3 * KEY_TILE + jb + kLanes, a31);
  }
}

// acc[m][0:d] += p[m][0:count] . v[0:count][0:d] for ROW_BLOCK rows m.
template <int64_t D>
inline void value_block(const float* p, const float* v, float* acc, int64_t count) {
  for (int64_t ib = 0; ib < D; ib += 2 * kLanes) {
    vfloat a00 = load(acc + ib), a01 = load(acc + ib + kLanes);
    vfloat a10 = load(acc + D + ib), a11 = load(acc + D + ib + kLanes);
    vfloat a20 = load(acc + 2 * D + ib), a21 = load(acc + 2 * D + ib + kLanes);
    vfloat a30 = load(acc + 3 * D + ib), a31 = load(acc + 3 * D + ib + kLanes);
    for (int64_t j = 0; j < count; ++j) {
      const vfloat v0 = load(v + j * D + ib), v1 = load(v + j * D + ib + kLanes);
      const vfloat p0 = splat(p[j]), p1 = splat(p[KEY_TILE + j]), p2 = splat(p[2 * KEY_TILE + j]),
                   p3 = splat(p[3 * KEY_TILE + j]);
      a00 += p0 * v0, a01 += p0 * v1, a10 += p1 * v0, a11 += p1 * v1;
      a20 += p2 * v0, a21 += p2 * v1, a30 += p3 * v0, a31 += p3 * v1;
    }
    store(acc + ib, a00), store(acc + ib + kLanes, a01);
    store(acc + D + ib, a10), store(acc + D + ib + kLanes, a11);
    store(acc + 2 * D + ib, a20), store(acc + 2 * D + ib + kLanes, a21);
    store(acc + 3 * D + ib, a30), store(acc + 3 * D + ib + kLanes, a31);
  }
}

struct Shapes {
  int64_t rows, heads, kv_heads, ctx;
  int64_t q_row_stride, k_head_stride, k_row_stride, v_head_stride, v_row_stride;  // elements; d contiguous
  float scale;
};

// One unit of work: a KV head and a tile of query positions; its rows m are position-major
// (m = position * group + head in the group), padded to whole register blocks.
struct Unit {
  int64_t h, first, positions, rows, padded, keys, offset, group;

  // Units are numbered so the longest and shortest tiles interleave (0, last, 1, last - 1, ...): the
  // threads' contiguous shares of a causal triangle come out even.
  static Unit of(int64_t unit, int64_t tiles, const Shapes& s) {
    const int64_t group = s.heads / s.kv_heads, order = unit / s.kv_heads;
    const int64_t tile = order % 2 == 0 ? order / 2 : tiles - 1 - order / 2;
    const int64_t first = tile * QUERY_TILE, positions = std::min(QUERY_TILE, s.rows - first);
    const int64_t rows = positions * group, offset = s.ctx - s.rows;  // offset: keys before the chunk
    return {unit % s.kv_heads, first, positions, rows, (rows + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK,
            offset + first + positions, offset, group};
  }

  // The first register block holding a row that sees any key of the tile at `start` (rows before it end
  // earlier: they are ordered by position).
  int64_t live_from(int64_t start) const {
    return std::max<int64_t>(0, start - offset - first) * group / ROW_BLOCK * ROW_BLOCK;
  }

  // How many of the tile's `count` keys row m sees (0 for padding rows).
  int64_t valid(int64_t m, int64_t start, int64_t count) const {
    return m < rows ? std::min(count, offset + first + m / group + 1 - start) : 0;
  }
};

inline int64_t max_unit_rows(const Shapes& s) {
  return (QUERY_TILE * (s.heads / s.kv_heads) + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK;
}

// The online softmax's bookkeeping for row m after a tile: the sum folds in `tile_sum` (exps taken
// against `new_max`) and the accumulator is rescaled when the max moved.
template <int64_t D>
inline void fold_tile(float* acc, float& run_max, float& run_sum, float new_max, float tile_sum) {
  const float rescale = exp_nonpositive(run_max - new_max);  // ~0 on the first tile (max was -inf)
  run_sum = run_sum * rescale + tile_sum;
  run_max = new_max;
  if (rescale != 1.f) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) acc[i] *= rescale;
  }
}

// out rows of the unit = acc / run_sum, in the output dtype.
template <typename T, int64_t D>
inline void write_unit(const Unit& u, const float* acc, const float* run_sum, T* out, const Shapes& s) {
  for (int64_t m = 0; m < u.rows; ++m) {
    T* dst = out + (u.first + m / u.group) * s.heads * D + (u.h * u.group + m % u.group) * D;
    const float inv = 1.f / run_sum[m];  // every row sees at least its own key
    for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(acc[m * D + i] * inv);
  }
}

template <typename T, int64_t D>
void attend(const T* q, const T* k, const T* v, T* out, const Shapes& s) {
  const int64_t tiles = (s.rows + QUERY_TILE - 1) / QUERY_TILE;
  const int64_t max_rows = max_unit_rows(s);
  at::parallel_for(0, tiles * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(max_rows * D), acc(max_rows * D), scores(max_rows * KEY_TILE);
    std::vector<float> kt(D * KEY_TILE), vf(KEY_TILE * D), run_max(max_rows), run_sum(max_rows);
    for (int64_t index = begin; index < end; ++index) {
      const Unit u = Unit::of(index, tiles, s);
      for (int64_t p = 0; p < u.positions; ++p) {
        const T* src = q + (u.first + p) * s.q_row_stride + u.h * u.group * D;
        float* dst = qf.data() + p * u.group * D;
        for (int64_t i = 0; i < u.group * D; ++i) dst[i] = widen(src[i]) * s.scale;
      }
      std::fill(qf.begin() + u.rows * D, qf.begin() + u.padded * D, 0.f);
      std::fill(acc.begin(), acc.begin() + u.padded * D, 0.f);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      const T* k_head = k + u.h * s.k_head_stride;
      const T* v_head = v + u.h * s.v_head_stride;
      for (int64_t start = 0; start < u.keys; start += KEY_TILE) {
        const int64_t count = std::min(KEY_TILE, u.keys - start);
        for (int64_t j = 0; j < count; ++j) {
          const T* kr = k_head + (start + j) * s.k_row_stride;
          const T* vr = v_head + (start + j) * s.v_row_stride;
          for (int64_t i = 0; i < D; ++i) kt[i * KEY_TILE + j] = widen(kr[i]);
          for (int64_t i = 0; i < D; ++i) vf[j * D + i] = widen(vr[i]);
        }
        for (int64_t j = count; j < KEY_TILE; ++j)
          for (int64_t i = 0; i < D; ++i) kt[i * KEY_TILE + j] = 0.f;
        const int64_t live_from = u.live_from(start);
        for (int64_t m = live_from; m < u.padded; m += ROW_BLOCK)
          score_block<D>(qf.data() + m * D, kt.data(), scores.data() + m * KEY_TILE);
        for (int64_t m = live_from; m < u.padded; ++m) {
          float* row = scores.data() + m * KEY_TILE;
          const int64_t valid = u.valid(m, start, count);
          if (valid <= 0) {
            std::fill(row, row + KEY_TILE, 0.f);
            continue;
          }
          const float new_max = std::max(run_max[m], *std::max_element(row, row + valid));
          const float sum = exp_minus_max(row, valid, new_max);
          std::fill(row + valid, row + KEY_TILE, 0.f);
          fold_tile<D>(acc.data() + m * D, run_max[m], run_sum[m], new_max, sum);
        }
        for (int64_t m = live_from; m < u.padded; m += ROW_BLOCK)
          value_block<D>(scores.data() + m * KEY_TILE, vf.data(), acc.data() + m * D, count);
      }
      write_unit<T, D>(u, acc.data(), run_sum.data(), out, s);
    }
  });
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// bfloat16 on CPUs with AVX512-BF16: both products run on vdpbf16ps (16 float32 lanes, each adding a
// pair of bf16 products), ~4x the float32 FMA rate. Its operands come in pairs along the reduced
// dimension, so K and V are first packed once per call (all query tiles share them):
//   kp [kv_head][key tile][d / 2][KEY_TILE]   lane j holds (K[j][2i], K[j][2i + 1])
//   vp [kv_head][key tile][KEY_TILE / 2][d]   lane d holds (V[2j][d], V[2j + 1][d])
// Scores stay float32 (scaled there); the probabilities go to bf16 for P . V, as flash-attention
// kernels do on GPUs.
#include <immintrin.h>

using conserve_kernels::exp_nonpositive16;
using conserve_kernels::first_lanes;

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// One row of a key tile: probs = bf16(exp(scores * scale - new_max)) for the first `valid` keys, 0 after;
// returns the max of scores * scale and the sum of the rounded probabilities (what P . V adds up).
inline float row_max(const float* row, int64_t valid, float scale) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < valid; j += 16)
    m = _mm512_mask_max_ps(m, first_lanes(valid - j), m, _mm512_loadu_ps(row + j));
  return _mm512_reduce_max_ps(m) * scale;
}

inline float row_probs(const float* row, uint16_t* probs, int64_t valid, float scale, float max) {
  const __m512 vscale = _mm512_set1_ps(scale), vmax = _mm512_set1_ps(max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < KEY_TILE; j += 16) {
    const __mmask16 lanes = j < valid ? first_lanes(valid - j) : static_cast<__mmask16>(0);
    const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, row + j), vscale, vmax);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp_nonpositive16(x));
    const __m256bh b = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), reinterpret_cast<const __m256i&>(b));
    const __m512i widened = _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(b)), 16);
    sum = _mm512_add_ps(sum, _mm512_castsi512_ps(widened));
  }
  return _mm512_reduce_add_ps(sum);
}

template <int64_t D>
void pack_kv(const c10::BFloat16* k, const c10::BFloat16* v, const Shapes& s, int64_t key_tiles,
             uint32_t* kp, uint32_t* vp) {
  at::parallel_for(0, s.kv_heads * key_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t h = unit / key_tiles, start = unit % key_tiles * KEY_TILE;
      uint32_t* kt = kp + unit * (D / 2) * KEY_TILE;
      uint16_t* vt = reinterpret_cast<uint16_t*>(vp + unit * (KEY_TILE / 2) * D);
      for (int64_t j = 0; j < KEY_TILE; ++j) {
        const int64_t key = start + j;
        if (key < s.ctx) {
          uint32_t row[D / 2];
          std::memcpy(row, k + h * s.k_head_stride + key * s.k_row_stride, sizeof row);
          for (int64_t i = 0; i < D / 2; ++i) kt[i * KEY_TILE + j] = row[i];
          const uint16_t* vr = reinterpret_cast<const uint16_t*>(v + h * s.v_head_stride + key * s.v_row_stride);
          for (int64_t i = 0; i < D; ++i) vt[((j / 2) * D + i) * 2 + j % 2] = vr[i];
        } else {  // past the context: zeros, never NaN from uninitialised memory
          for (int64_t i = 0; i < D / 2; ++i) kt[i * KEY_TILE + j] = 0;
          for (int64_t i = 0; i < D; ++i) vt[((j / 2) * D + i) * 2 + j % 2] = 0;
        }
      }
    }
  });
}

// ROW_BLOCK query rows (bf16 pairs, row stride D / 2) x V vectors of 16 keys (kp layout, row stride
// KEY_TILE) -> float32 scores (row stride KEY_TILE). 4 x 4 = 16 independent accumulators: vdpbf16ps's
// latency needs ~12 in flight to keep both pipes busy (4 x 2 ran at ~40% of its rate).
template <int64_t D, int V>
inline void score_rows(const uint32_t* q, const uint32_t* kt, float* scores) {
  __m512 a[ROW_BLOCK][V];
  for (int r = 0; r < ROW_BLOCK; ++r)
    for (int v = 0; v < V; ++v) a[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < D / 2; ++i) {
    __m512i k[V];
    for (int v = 0; v < V; ++v) k[v] = _mm512_loadu_si512(kt + i * KEY_TILE + 16 * v);
    for (int r = 0; r < ROW_BLOCK; ++r) {
      const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(q[r * D / 2 + i]));
      for (int v = 0; v < V; ++v) a[r][v] = dot_pairs(a[r][v], b, k[v]);
    }
  }
  for (int r = 0; r < ROW_BLOCK; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(scores + r * KEY_TILE + 16 * v, a[r][v]);
}

// acc[r][0 : 16 V] += probs[r] . V for ROW_BLOCK rows (probs: bf16 pairs, row stride KEY_TILE / 2;
// vt: the vp layout at this head dimension, row stride D; acc row stride D).
template <int64_t D, int V>
inline void value_rows(const uint32_t* probs, const uint32_t* vt, float* acc, int64_t pairs) {
  __m512 a[ROW_BLOCK][V];
  for (int r = 0; r < ROW_BLOCK; ++r)
    for (int v = 0; v < V; ++v) a[r][v] = _mm512_loadu_ps(acc + r * D + 16 * v);
  for (int64_t jj = 0; jj < pairs; ++jj) {
    __m512i x[V];
    for (int v = 0; v < V; ++v) x[v] = _mm512_loadu_si512(vt + jj * D + 16 * v);
    for (int r = 0; r < ROW_BLOCK; ++r) {
      const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(probs[r * KEY_TILE / 2 + jj]));
      for (int v = 0; v < V; ++v) a[r][v] = dot_pairs(a[r][v], b, x[v]);
    }
  }
  for (int r = 0; r < ROW_BLOCK; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + r * D + 16 * v, a[r][v]);
}

template <int64_t D>
void attend_bf16(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, c10::BFloat16* out,
                 const Shapes& s) {
  const int64_t tiles = (s.rows + QUERY_TILE - 1) / QUERY_TILE;
  const int64_t key_tiles = (s.ctx + KEY_TILE - 1) / KEY_TILE;
  const int64_t max_rows = max_unit_rows(s);
  std::vector<uint32_t> kp(s.kv_heads * key_tiles * (D / 2) * KEY_TILE), vp(s.kv_heads * key_tiles * (KEY_TILE / 2) * D);
  pack_kv<D>(k, v, s, key_tiles, kp.data(), vp.data());
  at::parallel_for(0, tiles * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> qb(max_rows * D / 2);  // query rows as bf16 pairs
    std::vector<uint16_t> probs(max_rows * KEY_TILE);
    std::vector<float> acc(max_rows * D), scores(max_rows * KEY_TILE), run_max(max_rows), run_sum(max_rows);
    for (int64_t index = begin; index < end; ++index) {
      const Unit u = Unit::of(index, tiles, s);
      for (int64_t p = 0; p < u.positions; ++p)
        std::memcpy(qb.data() + p * u.group * D / 2, q + (u.first + p) * s.q_row_stride + u.h * u.group * D,
                    u.group * D * sizeof(c10::BFloat16));
      std::fill(qb.begin() + u.rows * D / 2, qb.begin() + u.padded * D / 2, 0u);
      std::fill(acc.begin(), acc.begin() + u.padded * D, 0.f);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      for (int64_t start = 0; start < u.keys; start += KEY_TILE) {
        const int64_t count = std::min(KEY_TILE, u.keys - start);
        const uint32_t* kt = kp.data() + (u.h * key_tiles + start / KEY_TILE) * (D / 2) * KEY_TILE;
        const uint32_t* vt = vp.data() + (u.h * key_tiles + start / KEY_TILE) * (KEY_TILE / 2) * D;
        const int64_t live_from = u.live_from(start);
        for (int64_t m = live_from; m < u.padded; m += ROW_BLOCK) {
          const uint32_t* q0 = qb.data() + m * D / 2;
          for (int64_t jb = 0; jb < KEY_TILE; jb += 64) score_rows<D, 4>(q0, kt + jb, scores.data() + m * KEY_TILE + jb);
        }
        for (int64_t m = live_from; m < u.padded; ++m) {
          float* row = scores.data() + m * KEY_TILE;
          uint16_t* prow = probs.data() + m * KEY_TILE;
          const int64_t valid = u.valid(m, start, count);
          if (valid <= 0) {
            std::fill(prow, prow + KEY_TILE, uint16_t{0});
            continue;
          }
          const float new_max = std::max(run_max[m], row_max(row, valid, s.scale));
          const float sum = row_probs(row, prow, valid, s.scale, new_max);
          fold_tile<D>(acc.data() + m * D, run_max[m], run_sum[m], new_max, sum);
        }
        const int64_t pairs = (count + 1) / 2;
        for (int64_t m = live_from; m < u.padded; m += ROW_BLOCK) {
          const uint32_t* p0 = reinterpret_cast<const uint32_t*>(probs.data() + m * KEY_TILE);
          float* a = acc.data() + m * D;
          int64_t ib = 0;
          for (; ib + 64 <= D; ib += 64) value_rows<D, 4>(p0, vt + ib, a + ib, pairs);
          for (; ib < D; ib += 32) value_rows<D, 2>(p0, vt + ib, a + ib, pairs);
        }
      }
      write_unit<c10::BFloat16, D>(u, acc.data(), run_sum.data(), out, s);
    }
  });
}
#endif

// The dtype's own dot-product instructions where this build has them (true: done); else false and the
// float32 path runs.
template <typename T>
bool attend_natively(const T*, const T*, const T*, T*, const Shapes&, int64_t) {
  return false;
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
template <>
bool attend_natively(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, c10::BFloat16* out,
                     const Shapes& s, int64_t d) {
  if (d == 64) {
    attend_bf16<64>(q, k, v, out, s);
  } else if (d == 96) {
    attend_bf16<96>(q, k, v, out, s);
  } else if (d == 128) {
    attend_bf16<128>(q, k, v, out, s);
  } else {
    return false;
  }
  return true;
}
#endif

// q: [rows, heads, d] with heads packed; k, v: [kv_heads, ctx, d] with any strides on the first two
// dimensions, d contiguous, ctx >= rows. Returns [rows, heads, d]: row i attends to keys 0 .. ctx - rows + i.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && v.scalar_type() == k.scalar_type(),
              "q, k and v must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "the head dimension must be contiguous, and q's heads packed");
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k.size(0), ctx = k.size(1);
  TORCH_CHECK(k.size(2) == d && heads % kv_heads == 0, "head shapes do not match");
  TORCH_CHECK(ctx >= rows, "the context must include the chunk's own keys");
  auto out = at::empty({rows, heads, d}, q.options());
  const Shapes shapes{rows, heads, kv_heads, ctx, q.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      static_cast<float>(scale)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefill_attention", [&] {
    const auto* qp = q.const_data_ptr<scalar_t>();
    const auto* kp = k.const_data_ptr<scalar_t>();
    const auto* vp = v.const_data_ptr<scalar_t>();
    auto* op = out.mutable_data_ptr<scalar_t>();
    if (attend_natively(qp, kp, vp, op, shapes, d)) {
      return;
    }
    if (d == 64) {
      attend<scalar_t, 64>(qp, kp, vp, op, shapes);
    } else if (d == 128) {
      attend<scalar_t, 128>(qp, kp, vp, op, shapes);
    } else if (d == 96) {
      attend<scalar_t, 96>(qp, kp, vp, op, shapes);
    } else {
      TORCH_CHECK(false, "prefill_attention: head size ", d, " is not built (64, 96, 128)");
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conserve, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(conserve, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
