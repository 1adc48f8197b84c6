// The product of a decoding step's linear layers, out = x @ w.T + bias, for
// the few rows of activations a step has (one per sequence being decoded),
// with the weight stored in column panels (see core/fast/panels.py for where
// it is used and why). Shared by panel_linear.cpp (one layer per call) and
// decode_layer.cpp (a whole GPT-2 layer per call).
//
//   panels[p, k, j] = w[16 p + j, k]     (N rounded up to a multiple of 16, zero rows added)
//
// Each panel is one contiguous stream of K cache lines, one line per k: the
// sixteen weights of sixteen output columns. A k step loads that line once,
// broadcasts x[i, k] for every row i and does one fused multiply-add per row
// into the row's sixteen accumulators: every weight is read from memory once
// per call whatever the rows, and there is no horizontal sum at the end. P
// panels are worked on together (P * M accumulators, up to 24 of the 32
// vector registers) so that P streams are in flight per core, which this
// machine's memory needs to be read at full speed, and P * M independent
// chains keep both vector units busy. Each output is summed over k in order,
// one rounding per step: the fp32 dot product, as any summation order is.
//
// bf16 weights fill a cache line with two consecutive k for the sixteen
// columns, interleaved: panels[p, k, j] for k = 2 kk + t is stored at element
// (kk, j, t) of the panel. Each 32-bit lane then holds a column's two weights,
// and widening them to fp32 is a shift (the even k) and a mask (the odd k),
// exactly, where sixteen-wide bf16 rows need a conversion and a shift each.
// (AVX-512's bf16 dot product reads this layout too, and was tried: with bf16
// x it was slower from four rows up and no faster at one; docs/performance.md.)
// int8 weights (core.fast.speculative's draft) keep the fp32 layout, a sixteen-byte row
// per k, with one scale per column applied to the finished sum.
// x is widened to fp32 once per call; sums are fp32; a bf16 output is rounded
// to nearest even, as torch rounds.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace panel_kernels {

constexpr int kPanel = 16;
constexpr int kMaxRows = 8;
// Cache lines ahead of the current k that each stream asks for: the hardware
// prefetcher is slow to pick up many short streams at once.
constexpr int kAhead = 32;

inline void store(float* out, __mmask16 live, __m512 v) { _mm512_mask_storeu_ps(out, live, v); }

inline void store(at::BFloat16* out, __mmask16 live, __m512 v) {
  // Round to nearest even (NaN kept a quiet NaN), then keep the top halves.
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16(out, live, _mm512_cvtepi32_epi16(rounded));
}

inline const float* widen(const at::BFloat16* src, int64_t n, std::vector<float>& dst) {
  dst.resize(n);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  return dst.data();
}

// The end of a group: int8 weights' column scales applied, bias added, stored (masked past
// the last real column).
template <typename Out, int M, int P>
inline void finish(__m512 (&acc)[M][P], const float* scale, const float* bias, int64_t p, Out* out, int64_t N) {
  for (int j = 0; j < P; ++j) {
    const int64_t col = (p + j) * kPanel;
    const int64_t live_cols = std::min<int64_t>(kPanel, N - col);
    const __mmask16 live = static_cast<__mmask16>((1u << live_cols) - 1);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(live, bias + col) : _mm512_setzero_ps();
    if (scale != nullptr) {
      const __m512 s = _mm512_maskz_loadu_ps(live, scale + col);
      for (int i = 0; i < M; ++i) store(out + i * N + col, live, _mm512_fmadd_ps(acc[i][j], s, b));
    } else {
      for (int i = 0; i < M; ++i) store(out + i * N + col, live, _mm512_add_ps(acc[i][j], b));
    }
  }
}

// The sums over k of one group of P panels into acc (M rows x P panels), one function per
// weight type, each reading its panels from `base` on.

// fp32 weights: one cache line per k.
template <int M, int P>
inline void accumulate(__m512 (&acc)[M][P], const float* x, int64_t K, const float* base) {
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[P];
    for (int j = 0; j < P; ++j) {
      const float* line = base + (j * K + k) * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(line + kAhead * kPanel), _MM_HINT_T0);
      wv[j] = _mm512_loadu_ps(line);
    }
    for (int i = 0; i < M; ++i) {
      const __m512 xi = _mm512_set1_ps(x[i * K + k]);
      for (int j = 0; j < P; ++j) acc[i][j] = _mm512_fmadd_ps(xi, wv[j], acc[i][j]);
    }
  }
}

// bf16 weights, widened: each cache line holds k = 2 kk and 2 kk + 1, bf16 being the top
// half of an fp32 (the even k in the low halves of the 32-bit lanes, the odd in the high).
template <int M, int P>
inline void accumulate(__m512 (&acc)[M][P], const float* x, int64_t K, const at::BFloat16* base) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t kk = 0; kk < K / 2; ++kk) {
    __m512 even[P], odd[P];
    for (int j = 0; j < P; ++j) {
      const at::BFloat16* line = base + (j * K + 2 * kk) * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(line + kAhead * 2 * kPanel), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(line);
      even[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      odd[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    }
    for (int i = 0; i < M; ++i) {
      const __m512 x0 = _mm512_set1_ps(x[i * K + 2 * kk]), x1 = _mm512_set1_ps(x[i * K + 2 * kk + 1]);
      for (int j = 0; j < P; ++j) acc[i][j] = _mm512_fmadd_ps(x1, odd[j], _mm512_fmadd_ps(x0, even[j], acc[i][j]));
    }
  }
}

// int8 weights (a scale per column, applied by finish): one cache line per four k, each k's
// sixteen bytes widened to fp32 by one sign-extending load and one conversion.
template <int M, int P>
inline void accumulate(__m512 (&acc)[M][P], const float* x, int64_t K, const int8_t* base) {
  for (int64_t k = 0; k < K; k += 4) {
    for (int j = 0; j < P; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(base + (j * K + k) * kPanel + kAhead * 64), _MM_HINT_T0);
    for (int t = 0; t < 4; ++t) {
      __m512 wv[P];
      for (int j = 0; j < P; ++j) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + (j * K + k + t) * kPanel));
        wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
      }
      for (int i = 0; i < M; ++i) {
        const __m512 xi = _mm512_set1_ps(x[i * K + k + t]);
        for (int j = 0; j < P; ++j) acc[i][j] = _mm512_fmadd_ps(xi, wv[j], acc[i][j]);
      }
    }
  }
}

// Panels p0 to p1, P at a time (the rest one at a time): accumulators zeroed, the weight
// type's sums over k, the group's end.
template <typename Out, int M, int P, typename W>
void groups(const float* x, int64_t K, const W* w, const float* scale, const float* bias, int64_t p0, int64_t p1,
            Out* out, int64_t N) {
  int64_t p = p0;
  for (; p + P <= p1; p += P) {
    __m512 acc[M][P];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < P; ++j) acc[i][j] = _mm512_setzero_ps();
    accumulate<M, P>(acc, x, K, w + p * K * kPanel);
    finish<Out, M, P>(acc, scale, bias, p, out, N);
  }
  if constexpr (P > 1) {
    if (p < p1) groups<Out, M, 1>(x, K, w, scale, bias, p, p1, out, N);
  }
}

template <typename W, typename Out, int M>
void run(const float* x, int64_t K, const W* w, const float* scale, const float* bias, int64_t n_panels, Out* out,
         int64_t N) {
  // Up to 24 accumulators: 8 panels for one or two rows, 6 for three or four, 3 from five up.
  constexpr int P = M <= 2 ? 8 : M <= 4 ? 6 : 3;
  const int64_t n_groups = (n_panels + P - 1) / P;
  at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
    groups<Out, M, P>(x, K, w, scale, bias, g0 * P, std::min(g1 * P, n_panels), out, N);
  });
}

template <typename W, typename Out>
inline void dispatch(int64_t M, const float* x, int64_t K, const W* w, const float* scale, const float* bias,
                     int64_t n_panels, Out* out, int64_t N) {
  switch (M) {
    case 1: run<W, Out, 1>(x, K, w, scale, bias, n_panels, out, N); break;
    case 2: run<W, Out, 2>(x, K, w, scale, bias, n_panels, out, N); break;
    case 3: run<W, Out, 3>(x, K, w, scale, bias, n_panels, out, N); break;
    case 4: run<W, Out, 4>(x, K, w, scale, bias, n_panels, out, N); break;
    case 5: run<W, Out, 5>(x, K, w, scale, bias, n_panels, out, N); break;
    case 6: run<W, Out, 6>(x, K, w, scale, bias, n_panels, out, N); break;
    case 7: run<W, Out, 7>(x, K, w, scale, bias, n_panels, out, N); break;
    default: run<W, Out, 8>(x, K, w, scale, bias, n_panels, out, N); break;
  }
}

// A weight as the kernels take it: {panels} fp32 or bf16, or {panels, scales} int8 with
// one fp32 scale per (padded) column.
struct PanelWeight {
  const torch::Tensor& panels;
  const float* scale;
};

// The checks every caller makes: panels (N / 16, K, 16) that hold N outputs.
inline PanelWeight check_panels(const std::vector<torch::Tensor>& weight, int64_t K, int64_t N, const char* what) {
  TORCH_CHECK(weight.size() == 1 || weight.size() == 2, what, ": a weight is [panels] or [int8 panels, scales]");
  const torch::Tensor& panels = weight[0];
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.size(1) == K && panels.size(2) == kPanel,
              what, ": panels must be contiguous (N / 16, ", K, ", 16), got ", panels.sizes());
  TORCH_CHECK(N > (panels.size(0) - 1) * kPanel && N <= panels.size(0) * kPanel, what, ": N = ", N,
              " does not fit ", panels.size(0), " panels");
  const auto type = panels.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kChar, what, ": panels must be fp32, bf16 or int8");
  TORCH_CHECK(type != at::kBFloat16 || K % 2 == 0, what, ": bf16 panels pair their k, K must be even");
  TORCH_CHECK(type != at::kChar || K % 4 == 0, what, ": int8 panels are read four k at a time, K must be a multiple of 4");
  TORCH_CHECK((type == at::kChar) == (weight.size() == 2), what, ": int8 panels, and only they, come with scales");
  if (type != at::kChar) return {panels, nullptr};
  const torch::Tensor& scales = weight[1];
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == panels.size(0) * kPanel,
              what, ": scales must be ", panels.size(0) * kPanel, " contiguous fp32 values");
  return {panels, scales.data_ptr<float>()};
}

// out (M, N) = x (M, K) fp32 @ w.T + bias, w as fp32, bf16 or int8 panels; out fp32 or bf16.
template <typename Out>
inline void product(const float* x, int64_t M, int64_t K, const PanelWeight& w, const float* bias, Out* out, int64_t N) {
  const int64_t n = w.panels.size(0);
  switch (w.panels.scalar_type()) {
    case at::kFloat: dispatch(M, x, K, w.panels.data_ptr<float>(), w.scale, bias, n, out, N); break;
    case at::kBFloat16: dispatch(M, x, K, w.panels.data_ptr<at::BFloat16>(), w.scale, bias, n, out, N); break;
    default: dispatch(M, x, K, w.panels.data_ptr<int8_t>(), w.scale, bias, n, out, N); break;
  }
}

}  // namespace panel_kernels
