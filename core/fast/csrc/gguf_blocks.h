// The products from GGUF blocks that gguf_matvec.cpp binds for one layer,
// shared with decode_layer.cpp, which runs them inside a whole Llama layer.
// See gguf_matvec.cpp for the formats and the method.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace gguf_kernels {

constexpr int kBlock = 32;
constexpr int kMaxRows = 8;
constexpr int64_t kMaxBlocks = 1024;  // per weight row: K up to 32768

// n fp16 values to fp32, 16 at a time.
inline void halves_to_floats(const at::Half* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(live, src + i);
    _mm512_mask_storeu_ps(dst + i, live, _mm512_cvtph_ps(h));
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, a + i), _mm512_maskz_loadu_ps(live, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// The 32 integers of one block as two registers of 16 floats.
struct Q4_1 {
  static constexpr int kQBytes = 16;
  static inline void ints(const uint8_t* q, __m512& lo, __m512& hi) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
};

struct Q8_0 {
  static constexpr int kQBytes = 32;
  static inline void ints(const uint8_t* q, __m512& lo, __m512& hi) {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
  }
};

// Rows n0..n1 of the output, R weight rows at a time: each row's sum is a chain
// of fused multiply-adds, and R independent chains keep the vector units busy
// while each waits on its last result.
template <typename Format, int M, int R>
void rows(const float* x, const float* xsum, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* m,
          int64_t n0, int64_t n1, float* out, int64_t N) {
  const int64_t nb = K / kBlock, row_bytes = nb * Format::kQBytes;
  alignas(64) float scale[R][kMaxBlocks], offset[kMaxBlocks];
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    for (int r = 0; r < R; ++r) halves_to_floats(d + (n + r) * nb, nb, scale[r]);
    __m512 acc[M][R];
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m512 lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* q = qs + (n + r) * row_bytes + b * Format::kQBytes;
        // The hardware prefetcher is slow to follow many short rows: ask for the next ones.
        _mm_prefetch(reinterpret_cast<const char*>(q) + R * row_bytes, _MM_HINT_T0);
        Format::ints(q, lo[r], hi[r]);
      }
      if constexpr (M == 1) {
        // One row of x: x . q first, the scale once on that partial sum (3 vector operations).
        const __m512 x_lo = _mm512_loadu_ps(x + b * kBlock), x_hi = _mm512_loadu_ps(x + b * kBlock + 16);
        for (int r = 0; r < R; ++r) {
          const __m512 t = _mm512_fmadd_ps(x_hi, hi[r], _mm512_mul_ps(x_lo, lo[r]));
          acc[0][r] = _mm512_fmadd_ps(t, _mm512_set1_ps(scale[r][b]), acc[0][r]);
        }
      } else {
        // Several rows share the block: scale it once (d * q, gguf's own fp32 product),
        // then two fused multiply-adds per row of x instead of three operations.
        for (int r = 0; r < R; ++r) {
          const __m512 dr = _mm512_set1_ps(scale[r][b]);
          lo[r] = _mm512_mul_ps(lo[r], dr);
          hi[r] = _mm512_mul_ps(hi[r], dr);
        }
        for (int i = 0; i < M; ++i) {
          const float* xb = x + i * K + b * kBlock;
          const __m512 x_lo = _mm512_loadu_ps(xb), x_hi = _mm512_loadu_ps(xb + 16);
          for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(x_hi, hi[r], _mm512_fmadd_ps(x_lo, lo[r], acc[i][r]));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      if (m != nullptr) halves_to_floats(m + (n + r) * nb, nb, offset);
      for (int i = 0; i < M; ++i) {
        const float sum = _mm512_reduce_add_ps(acc[i][r]);
        out[i * N + n + r] = m != nullptr ? sum + dot(offset, xsum + i * nb, nb) : sum;
      }
    }
  }
  if constexpr (R > 1) {
    if (n < n1) rows<Format, M, 1>(x, xsum, K, qs, d, m, n, n1, out, N);
  }
}

template <typename Format, int M>
void run(const float* x, const float* xsum, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* m,
         int64_t N, float* out) {
  // Four chains in flight whatever M: four weight rows for one row of x, two for two, one from four up.
  constexpr int R = M == 1 ? 4 : M < 4 ? 2 : 1;
  // 16 rows per task at least: a row of a small model is well under a page.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { rows<Format, M, R>(x, xsum, K, qs, d, m, n0, n1, out, N); });
}

// The checks every caller makes: blocks of N rows of K weights in Format.
template <typename Format>
inline void check_blocks(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                         int64_t K, const char* what) {
  const int64_t N = qs.size(0), nb = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && nb <= kMaxBlocks, what, ": ", K, " inputs; the kernels take multiples of 32 up to ",
              kMaxBlocks * kBlock);
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) == nb * Format::kQBytes,
              what, ": qs must be contiguous uint8 (N, ", nb * Format::kQBytes, ") for ", K, " weights per row, got ",
              qs.sizes());
  auto check_scales = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 2 && t.size(0) == N && t.size(1) == nb,
                what, ": ", name, " must be contiguous fp16 (", N, ", ", nb, "), got ", t.sizes());
  };
  check_scales(d, "d");
  if (m.has_value()) check_scales(*m, "m");
  TORCH_CHECK(m.has_value() == (Format::kQBytes == 16), what, ": Q4_1 blocks need their offsets m, Q8_0 blocks have none");
}

// out (M, N) fp32 = x (M, K) fp32 @ W.T, W as blocks: integers qs, fp16 scales d and,
// for Q4_1, fp16 offsets m (nullptr for Q8_0). The caller has checked the shapes.
template <typename Format>
inline void product(const float* x, int64_t M, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* m,
                    int64_t N, float* out) {
  const int64_t nb = K / kBlock;
  // The sums of x per block, for the offsets: a few hundred floats, summed here rather
  // than by a torch op whose dispatch would cost more than the sums.
  alignas(64) float sp[kMaxRows * kMaxBlocks];
  if (m != nullptr) {
    for (int64_t i = 0; i < M * nb; ++i) sp[i] = _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_loadu_ps(x + i * kBlock), _mm512_loadu_ps(x + i * kBlock + 16)));
  }
  switch (M) {
    case 1: run<Format, 1>(x, sp, K, qs, d, m, N, out); break;
    case 2: run<Format, 2>(x, sp, K, qs, d, m, N, out); break;
    case 3: run<Format, 3>(x, sp, K, qs, d, m, N, out); break;
    case 4: run<Format, 4>(x, sp, K, qs, d, m, N, out); break;
    case 5: run<Format, 5>(x, sp, K, qs, d, m, N, out); break;
    case 6: run<Format, 6>(x, sp, K, qs, d, m, N, out); break;
    case 7: run<Format, 7>(x, sp, K, qs, d, m, N, out); break;
    default: run<Format, 8>(x, sp, K, qs, d, m, N, out); break;
  }
}

}  // namespace gguf_kernels
