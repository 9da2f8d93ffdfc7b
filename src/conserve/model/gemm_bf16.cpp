// bfloat16 matmuls on vdpbf16ps (AVX512-BF16) for the layer projections and the lm_head
// (gemm_kernel.py builds and loads this file): y[M, N] = x[M, K] . w[N, K]^T (+ bias), float32
// accumulation, bfloat16 out.
//
// Why: at a decode batch of ~32 rows oneDNN ran SmolLM2's projections at 290-490 GFLOP/s on Zen5
// (this kernel reaches ~990 in cache): its per-call set-up and blocking are tuned for large matrices. A batch this size
// reads every weight once per step, so the kernel is a weight stream: each PANEL of 48 output
// columns is read once per call and applied to all rows from L1/L2.
//
// The weight is packed once at load: panel-major [N / 48][K / 2][48] of bf16 pairs, so lane j of a
// vector holds (w[n][2p], w[n][2p + 1]) and vdpbf16ps multiplies it with a broadcast pair of x.
// A register block is ROWS x 3 vectors (24 float32 accumulators for 8 rows).
//
// A fused gate/up projection ([2I, K]: gate rows, then up rows) can be packed "gated": gate panel j and
// up panel j side by side, so one thread computes both for a group of rows and its epilogue writes
// silu(gate) * up straight out ([M, I]): no [M, 2I] intermediate written and read back (at 1024
// prompt rows that is 6 MB each way, and the separate SiLU-gating pass ~0.7 ms a layer).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_common.h"

namespace {

constexpr int64_t kVec = 16;                // float32 lanes / bf16 pairs per vector
constexpr int64_t kPanelVecs = 3;           // vectors of output columns per panel
constexpr int64_t kPanel = kVec * kPanelVecs;  // output columns per panel
constexpr int64_t kRows = 8;                // rows per register block
constexpr int64_t kGroupRows = 64;          // rows whose x stays in L2 while the panels pass
constexpr int64_t kAhead = 64;              // pairs the first row block prefetches ahead (12 KB)

int64_t panels_for(int64_t n) { return (n + kPanel - 1) / kPanel; }

// Rows [first, first + count) of w ([*, K] bf16 as uint32 pairs) -> panels at dst, columns past count zero.
void pack_rows(const uint32_t* src, int64_t k2, int64_t first, int64_t count, uint32_t* dst, int64_t panel_stride) {
  at::parallel_for(0, panels_for(count), 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel)
      for (int64_t j = 0; j < kPanel && panel * kPanel + j < count; ++j) {
        const uint32_t* row = src + (first + panel * kPanel + j) * k2;
        uint32_t* out = dst + panel * panel_stride + j;
        for (int64_t p = 0; p < k2; ++p) out[p * kPanel] = row[p];
      }
  });
}

// w: [N, K] bf16 (K even) -> [panels][K / 2][kPanel] int32 pairs, columns past N zero. gated: w is
// [2I, K] gate-then-up, and the panels alternate gate j, up j (2 * ceil(I / 48) panels).
at::Tensor pack_bf16_weight(const at::Tensor& w, bool gated) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_bf16_weight: w must be bfloat16 [N, K]");
  TORCH_CHECK(w.size(1) % 2 == 0, "pack_bf16_weight: K must be even");
  TORCH_CHECK(!gated || w.size(0) % 2 == 0, "pack_bf16_weight: a gated weight needs an even N");
  const auto wc = w.contiguous();
  const int64_t n = wc.size(0), k2 = wc.size(1) / 2;
  const int64_t panels = gated ? 2 * panels_for(n / 2) : panels_for(n);
  auto packed = at::zeros({panels, k2, kPanel}, wc.options().dtype(at::kInt));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(wc.const_data_ptr<c10::BFloat16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>());
  const int64_t panel_size = k2 * kPanel;
  if (gated) {
    pack_rows(src, k2, 0, n / 2, dst, 2 * panel_size);               // gate: even panels
    pack_rows(src, k2, n / 2, n / 2, dst + panel_size, 2 * panel_size);  // up: odd panels
  } else {
    pack_rows(src, k2, 0, n, dst, panel_size);
  }
  return packed;
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// R rows (x as bf16 pairs, row stride ldx pairs) times one panel (k2 pairs), added into acc (float32
// [R][48]). `ahead`: also ask for the weights kAhead pairs on (past the panel's end: the next panel's,
// which follows it in memory).
template <int R>
inline void accumulate(const uint32_t* x, int64_t ldx, const uint32_t* panel, int64_t k2, float* acc, bool ahead) {
  __m512 a[R][kPanelVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v) a[r][v] = _mm512_loadu_ps(acc + (r * kPanelVecs + v) * kVec);
  for (int64_t p = 0; p < k2; ++p) {
    const uint32_t* w = panel + p * kPanel;
    if (ahead) {
      const char* next = reinterpret_cast<const char*>(w + kAhead * kPanel);
      _mm_prefetch(next, _MM_HINT_T0), _mm_prefetch(next + 64, _MM_HINT_T0), _mm_prefetch(next + 128, _MM_HINT_T0);
    }
    const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + kVec), w2 = _mm512_loadu_si512(w + 2 * kVec);
    for (int r = 0; r < R; ++r) {
      const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(x[r * ldx + p]));
      a[r][0] = dot_pairs(a[r][0], b, w0);
      a[r][1] = dot_pairs(a[r][1], b, w1);
      a[r][2] = dot_pairs(a[r][2], b, w2);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v) _mm512_storeu_ps(acc + (r * kPanelVecs + v) * kVec, a[r][v]);
}

using AccumulateFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*, bool);
constexpr AccumulateFn kAccumulate[kRows + 1] = {nullptr, accumulate<1>, accumulate<2>, accumulate<3>, accumulate<4>,
                                                 accumulate<5>, accumulate<6>, accumulate<7>, accumulate<8>};

// acc rows + bias -> bf16 y columns [0, cols) of the panel.
inline void write_rows(const float* acc, int64_t rows, const float* bias, c10::BFloat16* y, int64_t ldy, int64_t cols) {
  for (int v = 0; v < kPanelVecs; ++v) {
    const int64_t left = cols - v * kVec;
    if (left <= 0) break;
    const __mmask16 lanes = conserve_kernels::first_lanes(left);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(lanes, bias + v * kVec) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 out = _mm512_add_ps(_mm512_loadu_ps(acc + (r * kPanelVecs + v) * kVec), add);
      const __m256bh rounded = _mm512_cvtneps_pbh(out);
      _mm256_mask_storeu_epi16(y + r * ldy + v * kVec, lanes, reinterpret_cast<const __m256i&>(rounded));
    }
  }
}

// silu(gate) * up of accumulated rows -> bf16 y columns [0, cols).
inline void write_gated_rows(const float* gate, const float* up, int64_t rows, c10::BFloat16* y, int64_t ldy,
                             int64_t cols) {
  for (int v = 0; v < kPanelVecs; ++v) {
    const int64_t left = cols - v * kVec;
    if (left <= 0) break;
    const __mmask16 lanes = conserve_kernels::first_lanes(left);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 g = _mm512_loadu_ps(gate + (r * kPanelVecs + v) * kVec);
      const __m512 u = _mm512_loadu_ps(up + (r * kPanelVecs + v) * kVec);
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(conserve_kernels::silu16(g), u));
      _mm256_mask_storeu_epi16(y + r * ldy + v * kVec, lanes, reinterpret_cast<const __m256i&>(rounded));
    }
  }
}
#endif

// How linear_bf16 reads the panels and writes y.
enum Mode : int64_t { kPlain = 0, kGatedPlain = 1, kGatedSilu = 2 };

// x: [M, K] bf16 (rows dense), packed from pack_bf16_weight, n: the weight's N, bias: [N] float32 or
// undefined. mode kPlain: y = x w^T ([M, N]); for a gated packing kGatedPlain gives the same [M, N]
// (gate columns, then up), kGatedSilu gives silu(gate) * up ([M, N / 2]). Returns bf16.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias,
                       int64_t mode) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "linear_bf16: x must be bfloat16 [M, K]");
  TORCH_CHECK(mode == kPlain || mode == kGatedPlain || mode == kGatedSilu, "linear_bf16: unknown mode");
  const bool gated = mode != kPlain;
  const int64_t width = gated ? n / 2 : n;  // columns per half (gated) or in all
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kInt && packed.is_contiguous() &&
                  packed.size(0) == (gated ? 2 : 1) * panels_for(width) && packed.size(2) == kPanel &&
                  packed.size(1) * 2 == x.size(1) && (!gated || n % 2 == 0),
              "linear_bf16: packed does not match x and n");
  TORCH_CHECK(x.stride(0) % 2 == 0, "linear_bf16: x's row stride must be even");
  const float* bias_ptr = nullptr;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(!gated, "linear_bf16: a gated weight takes no bias");
    bias_f = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.numel() == n, "linear_bf16: bias must have N entries");
    bias_ptr = bias_f.const_data_ptr<float>();
  }
  const int64_t m = x.size(0), k2 = packed.size(1);
  const int64_t out_cols = mode == kGatedSilu ? width : n;
  auto y = at::empty({m, out_cols}, x.options());
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const uint32_t* xs = reinterpret_cast<const uint32_t*>(x.const_data_ptr<c10::BFloat16>());
  const int64_t ldx = x.stride(0) / 2;
  const uint32_t* ws = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>());
  c10::BFloat16* ys = y.mutable_data_ptr<c10::BFloat16>();
  // Work unit: one panel (plain) or a gate panel with its up panel (gated). Rows go in groups of
  // kGroupRows; within a group each row block walks the whole panel (the panel stays in L2 for the next
  // block, the group's rows stay in L2 for the next panel); the first block reads the panel from
  // memory, asking kAhead pairs ahead. Walking a panel in L1-sized chunks, every row block per chunk,
  // was tried: no clear change at 8-64 rows, 10-20% slower at 512+.
  const int64_t units = panels_for(width), per_unit = gated ? 2 : 1;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(per_unit * kGroupRows * kPanel);
    for (int64_t group = 0; group < m; group += kGroupRows) {
      const int64_t group_rows = std::min(kGroupRows, m - group);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t col = unit * kPanel, cols = std::min(kPanel, width - col);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t half = 0; half < per_unit; ++half) {
          const uint32_t* w = ws + (unit * per_unit + half) * k2 * kPanel;
          float* out = acc.data() + half * kGroupRows * kPanel;
          for (int64_t row = 0; row < group_rows; row += kRows) {
            const int64_t rows = std::min(kRows, group_rows - row);
            kAccumulate[rows](xs + (group + row) * ldx, ldx, w, k2, out + row * kPanel, row == 0);
          }
        }
        for (int64_t row = 0; row < group_rows; row += kRows) {
          const int64_t rows = std::min(kRows, group_rows - row);
          c10::BFloat16* dst = ys + (group + row) * out_cols + col;
          const float* gate = acc.data() + row * kPanel;
          if (mode == kGatedSilu) {
            write_gated_rows(gate, gate + kGroupRows * kPanel, rows, dst, out_cols, cols);
          } else {
            write_rows(gate, rows, bias_ptr ? bias_ptr + col : nullptr, dst, out_cols, cols);
            if (gated) write_rows(gate + kGroupRows * kPanel, rows, nullptr, dst + width, out_cols, cols);
          }
        }
      }
    }
  });
#else
  TORCH_CHECK(false, "linear_bf16: this build has no AVX512-BF16");
#endif
  return y;
}

bool available() {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conserve, m) {
  m.def("pack_bf16_weight(Tensor w, bool gated=False) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor packed, int n, Tensor? bias, int mode=0) -> Tensor");
  m.def("gemm_bf16_available() -> bool");
}

TORCH_LIBRARY_IMPL(conserve, CPU, m) {
  m.impl("pack_bf16_weight", &pack_bf16_weight);
  m.impl("linear_bf16", &linear_bf16);
}

TORCH_LIBRARY_IMPL(conserve, CompositeExplicitAutograd, m) { m.impl("gemm_bf16_available", &available); }
