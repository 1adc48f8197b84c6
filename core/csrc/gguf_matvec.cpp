// Matrix-vector products that read GGUF's block-quantized weights as they are
// stored (the weight-only kernels of llama.cpp's ggml, written again for
// torch's CPU tensors; see core/gguf_matvec.py for why and how it is used).
//
//   out[i, n] = sum_k x[i, k] * w[n, k]
//
// x: (M, K) fp32 with M small (decoding: one to a few rows). Each weight row
// is K / 32 blocks; a block is a scale d (and for Q4_1 an offset m), fp16,
// and 32 small integers q:
//   Q4_1: w = d * q + m, q in 0..15, two per byte (low nibbles are elements
//         0..15 of the block, high nibbles 16..31)
//   Q8_0: w = d * q,     q in -128..127
// The caller splits GGUF's interleaved blocks into the integers (qs), the
// scales (d) and the offsets (m), so each is read as one contiguous stream.
//
// A block's contribution is d * (x . q) + m * sum(x); the sums of x per block
// are computed once per call. For one row of x the integers are turned into
// floats and multiplied by x first, and the block's scale is applied once to
// that partial sum: half the vector instructions of dequantizing every weight,
// which is what the CPU's two vector ports, not memory, limited before. From
// two rows up the block is scaled once (d * q) and shared by the rows, two
// fused multiply-adds each: a third fewer instructions at eight rows. The products
// are those of the dense fp32 weights gguf's dequantizer produces up to fp32
// rounding in another order (for a one-hot x, exactly those weights).
//
// The weights are read once per call whatever M is, rows split across torch's
// threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

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

template <typename Format>
torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                     const c10::optional<torch::Tensor>& m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous (M, K) fp32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), nb = K / kBlock;
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "x must have 1 to ", kMaxRows, " rows, got ", M);
  TORCH_CHECK(K % kBlock == 0 && nb <= kMaxBlocks, "x has ", K, " columns; the kernels take multiples of 32 up to ",
              kMaxBlocks * kBlock);
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) == nb * Format::kQBytes,
              "qs must be contiguous uint8 (N, ", nb * Format::kQBytes, ") for ", K, " weights per row, got ", qs.sizes());
  auto check_scales = [&](const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 2 && t.size(0) == N && t.size(1) == nb,
                what, " must be contiguous fp16 (", N, ", ", nb, "), got ", t.sizes());
  };
  check_scales(d, "d");
  if (m.has_value()) check_scales(*m, "m");
  TORCH_CHECK(m.has_value() == (Format::kQBytes == 16), "Q4_1 blocks need their offsets m, Q8_0 blocks have none");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  // The sums of x per block, for the offsets: a few hundred floats, summed here rather
  // than by a torch op whose dispatch would cost more than the sums.
  alignas(64) float sp[kMaxRows * kMaxBlocks];
  if (m.has_value()) {
    for (int64_t i = 0; i < M * nb; ++i) sp[i] = _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_loadu_ps(xp + i * kBlock), _mm512_loadu_ps(xp + i * kBlock + 16)));
  }
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.has_value() ? m->data_ptr<at::Half>() : nullptr;
  float* op = out.data_ptr<float>();
  switch (M) {
    case 1: run<Format, 1>(xp, sp, K, qp, dp, mp, N, op); break;
    case 2: run<Format, 2>(xp, sp, K, qp, dp, mp, N, op); break;
    case 3: run<Format, 3>(xp, sp, K, qp, dp, mp, N, op); break;
    case 4: run<Format, 4>(xp, sp, K, qp, dp, mp, N, op); break;
    case 5: run<Format, 5>(xp, sp, K, qp, dp, mp, N, op); break;
    case 6: run<Format, 6>(xp, sp, K, qp, dp, mp, N, op); break;
    case 7: run<Format, 7>(xp, sp, K, qp, dp, mp, N, op); break;
    default: run<Format, 8>(xp, sp, K, qp, dp, mp, N, op); break;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_1", &matvec<Q4_1>, "x (M, K) fp32 times the transpose of Q4_1 rows: qs (N, K / 2) uint8, d and m (N, K / 32) fp16");
  m.def("q8_0", &matvec<Q8_0>, "x (M, K) fp32 times the transpose of Q8_0 rows: qs (N, K) int8 as uint8, d (N, K / 32) fp16");
  m.attr("max_rows") = kMaxRows;
}
