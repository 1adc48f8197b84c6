// Matrix-vector products that read GGUF's block-quantized weights as they are
// stored (the weight-only kernels of llama.cpp's ggml, written again for
// torch's CPU tensors; see core/gguf_matvec.py for why and how it is used).
//
//   out[m, n] = sum_k x[m, k] * w[n, k]
//
// x: (M, K) fp32 with M small (decoding: one to a few rows); w: (N, bytes per
// row) uint8, each row K / 32 blocks:
//   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles (low nibbles are elements 0..15
//         of the block, high nibbles 16..31); w = d * q + m
//   Q8_0: fp16 d, 32 int8;                                    w = d * q
// d * q is exact in fp32 (an 11-bit mantissa times a small integer), and a
// fused multiply-add rounds d * q + m once, as the dequantizer's separate
// multiply and add do when the product is exact: the weights used here are
// bit for bit the fp32 weights gguf's numpy dequantizer produces. Only the
// order of the sums differs from a dense fp32 matrix product.
//
// The weights are read once per call whatever M is (each dequantized block
// serves every row of x), in 16-lane AVX-512 registers, rows split across
// torch's threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>

namespace {

constexpr int kBlock = 32;
constexpr int kMaxRows = 8;

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

struct Q4_1 {
  static constexpr int kBytes = 20;
  // The block's 32 weights as two registers of 16 fp32.
  static inline void load(const uint8_t* block, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(half_to_float(block));
    const __m512 m = _mm512_set1_ps(half_to_float(block + 2));
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m512 q_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
    const __m512 q_hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask)));
    lo = _mm512_fmadd_ps(q_lo, d, m);
    hi = _mm512_fmadd_ps(q_hi, d, m);
  }
};

struct Q8_0 {
  static constexpr int kBytes = 34;
  static inline void load(const uint8_t* block, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(half_to_float(block));
    const __m128i q_lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
    const __m128i q_hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 18));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q_lo)), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q_hi)), d);
  }
};

template <typename Format, int M>
void rows(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* out,
          int64_t N) {
  const int64_t blocks = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m512 acc_lo[M], acc_hi[M];
    for (int i = 0; i < M; ++i) acc_lo[i] = acc_hi[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      // The next rows are where the hardware prefetcher is slow to follow us.
      _mm_prefetch(reinterpret_cast<const char*>(row + b * Format::kBytes) + 2 * row_bytes, _MM_HINT_T0);
      __m512 lo, hi;
      Format::load(row + b * Format::kBytes, lo, hi);
      for (int i = 0; i < M; ++i) {
        const float* xb = x + i * K + b * kBlock;
        acc_lo[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), lo, acc_lo[i]);
        acc_hi[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), hi, acc_hi[i]);
      }
    }
    for (int i = 0; i < M; ++i) out[i * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[i], acc_hi[i]));
  }
}

template <typename Format, int M>
void run(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t N, float* out) {
  // 16 rows per task at least: a row of a small model is well under a page.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { rows<Format, M>(x, K, w, row_bytes, n0, n1, out, N); });
}

template <typename Format>
torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous (M, K) fp32 tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "w must be a contiguous (N, bytes) uint8 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "x must have 1 to ", kMaxRows, " rows, got ", M);
  TORCH_CHECK(K % kBlock == 0 && w.size(1) == K / kBlock * Format::kBytes,
              "w has ", w.size(1), " bytes per row, which does not hold ", K, " weights in this format");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t rb = w.size(1);
  switch (M) {
    case 1: run<Format, 1>(xp, K, wp, rb, N, op); break;
    case 2: run<Format, 2>(xp, K, wp, rb, N, op); break;
    case 3: run<Format, 3>(xp, K, wp, rb, N, op); break;
    case 4: run<Format, 4>(xp, K, wp, rb, N, op); break;
    case 5: run<Format, 5>(xp, K, wp, rb, N, op); break;
    case 6: run<Format, 6>(xp, K, wp, rb, N, op); break;
    case 7: run<Format, 7>(xp, K, wp, rb, N, op); break;
    default: run<Format, 8>(xp, K, wp, rb, N, op); break;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_1", &matvec<Q4_1>, "x (M, K) fp32 times the transpose of Q4_1 rows w (N, K / 32 * 20 bytes)");
  m.def("q8_0", &matvec<Q8_0>, "x (M, K) fp32 times the transpose of Q8_0 rows w (N, K / 32 * 34 bytes)");
  m.attr("max_rows") = kMaxRows;
}
