// The product of a decoding step's linear layers, out = x @ w.T + bias, for
// the few rows of activations a step has (one per sequence being decoded),
// with the weight stored in column panels (see core/panel_linear.py for where
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
// Weights are fp32, or bf16 widened to fp32 in registers (exact); x is fp32 or
// bf16 (widened once per call); sums are fp32; a bf16 output is rounded to
// nearest even, as torch rounds.

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

inline __m512 load_weights(const float* w) { return _mm512_loadu_ps(w); }

inline __m512 load_weights(const at::BFloat16* w) {
  // bf16 is the top half of an fp32: widening is a shift.
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

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

template <typename W, typename Out, int M, int P>
void groups(const float* x, int64_t K, const W* w, const float* bias, int64_t p0, int64_t p1, Out* out, int64_t N) {
  int64_t p = p0;
  for (; p + P <= p1; p += P) {
    __m512 acc[M][P];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < P; ++j) acc[i][j] = _mm512_setzero_ps();
    const W* base = w + p * K * kPanel;
    for (int64_t k = 0; k < K; ++k) {
      __m512 wv[P];
      for (int j = 0; j < P; ++j) {
        const W* line = base + (j * K + k) * kPanel;
        _mm_prefetch(reinterpret_cast<const char*>(line + kAhead * kPanel), _MM_HINT_T0);
        wv[j] = load_weights(line);
      }
      for (int i = 0; i < M; ++i) {
        const __m512 xi = _mm512_set1_ps(x[i * K + k]);
        for (int j = 0; j < P; ++j) acc[i][j] = _mm512_fmadd_ps(xi, wv[j], acc[i][j]);
      }
    }
    for (int j = 0; j < P; ++j) {
      const int64_t col = (p + j) * kPanel;
      const int64_t live_cols = std::min<int64_t>(kPanel, N - col);
      const __mmask16 live = static_cast<__mmask16>((1u << live_cols) - 1);
      const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(live, bias + col) : _mm512_setzero_ps();
      for (int i = 0; i < M; ++i) store(out + i * N + col, live, _mm512_add_ps(acc[i][j], b));
    }
  }
  if constexpr (P > 1) {
    if (p < p1) groups<W, Out, M, 1>(x, K, w, bias, p, p1, out, N);
  }
}

template <typename W, typename Out, int M>
void run(const float* x, int64_t K, const W* w, const float* bias, int64_t n_panels, Out* out, int64_t N) {
  // Up to 24 accumulators: 8 panels for one or two rows, 6 for three or four, 3 from five up.
  constexpr int P = M <= 2 ? 8 : M <= 4 ? 6 : 3;
  const int64_t n_groups = (n_panels + P - 1) / P;
  at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
    groups<W, Out, M, P>(x, K, w, bias, g0 * P, std::min(g1 * P, n_panels), out, N);
  });
}

template <typename W, typename Out>
inline void dispatch(int64_t M, const float* x, int64_t K, const W* w, const float* bias, int64_t n_panels, Out* out, int64_t N) {
  switch (M) {
    case 1: run<W, Out, 1>(x, K, w, bias, n_panels, out, N); break;
    case 2: run<W, Out, 2>(x, K, w, bias, n_panels, out, N); break;
    case 3: run<W, Out, 3>(x, K, w, bias, n_panels, out, N); break;
    case 4: run<W, Out, 4>(x, K, w, bias, n_panels, out, N); break;
    case 5: run<W, Out, 5>(x, K, w, bias, n_panels, out, N); break;
    case 6: run<W, Out, 6>(x, K, w, bias, n_panels, out, N); break;
    case 7: run<W, Out, 7>(x, K, w, bias, n_panels, out, N); break;
    default: run<W, Out, 8>(x, K, w, bias, n_panels, out, N); break;
  }
}

// The checks every caller makes: panels (N / 16, K, 16) that hold N outputs.
inline void check_panels(const torch::Tensor& panels, int64_t K, int64_t N, const char* what) {
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.size(1) == K && panels.size(2) == kPanel,
              what, ": panels must be contiguous (N / 16, ", K, ", 16), got ", panels.sizes());
  TORCH_CHECK(N > (panels.size(0) - 1) * kPanel && N <= panels.size(0) * kPanel, what, ": N = ", N,
              " does not fit ", panels.size(0), " panels");
  TORCH_CHECK(panels.scalar_type() == at::kFloat || panels.scalar_type() == at::kBFloat16,
              what, ": panels must be fp32 or bf16");
}

// out (M, N) fp32 = x (M, K) fp32 @ w.T + bias, w as fp32 or bf16 panels.
inline void product(const float* x, int64_t M, int64_t K, const torch::Tensor& panels, const float* bias, float* out,
                    int64_t N) {
  if (panels.scalar_type() == at::kFloat) dispatch(M, x, K, panels.data_ptr<float>(), bias, panels.size(0), out, N);
  else dispatch(M, x, K, panels.data_ptr<at::BFloat16>(), bias, panels.size(0), out, N);
}

}  // namespace panel_kernels
