// Matrix-vector products that read GGUF's block-quantized weights as they are
// stored (the weight-only kernels of llama.cpp's ggml, written again for
// torch's CPU tensors; see core/fast/gguf_matvec.py for why and how it is used).
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

#include "gguf_blocks.h"

namespace {

using namespace gguf_kernels;

template <typename Format>
torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                     const c10::optional<torch::Tensor>& m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous (M, K) fp32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "x must have 1 to ", kMaxRows, " rows, got ", M);
  check_blocks<Format>(qs, d, m, K, "matvec");
  auto out = torch::empty({M, N}, x.options());
  product<Format>(x.data_ptr<float>(), M, K, qs.data_ptr<uint8_t>(), d.data_ptr<at::Half>(),
                  m.has_value() ? m->data_ptr<at::Half>() : nullptr, N, out.data_ptr<float>());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_1", &matvec<Q4_1>, "x (M, K) fp32 times the transpose of Q4_1 rows: qs (N, K / 2) uint8, d and m (N, K / 32) fp16");
  m.def("q8_0", &matvec<Q8_0>, "x (M, K) fp32 times the transpose of Q8_0 rows: qs (N, K) int8 as uint8, d (N, K / 32) fp16");
  m.attr("max_rows") = kMaxRows;
}
