// RMSNorm and rotary embedding, each one pass over fp32 rows (see
// core/fast/fused_ops.py for where they are used and why).
//
// A Llama decoding step runs these on a single token per sequence: 576
// numbers for SmolLM2's RMSNorm, 12 heads of 64 for its rotation. torch
// computes each as a chain of element-wise kernels (square, mean, add, rsqrt,
// multiply, multiply; or slice, negate, concatenate, multiply, multiply, add),
// and at that size the cost is the dispatch of each kernel, not the
// arithmetic, 91 calls a step (figures in docs/performance.md). Here each is
// one call.
//
//   rms_norm: out = weight * (x * (1 / sqrt(mean(x^2) + eps)))
//   rope:     out[:half] = x[:half] * cos[:half] - x[half:] * sin[:half]
//             out[half:] = x[half:] * cos[half:] + x[:half] * sin[half:]
//
// rope rounds exactly as core.model.layers.apply_rope does in fp32 (each product
// rounded, then the sum: no fused multiply-add), so its results are equal bit
// for bit. rms_norm sums the squares in another order than torch's
// reduction, so it agrees to fp32 rounding.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "fused_ops.h"

namespace {

using namespace fused_rows;

constexpr int64_t kGrainRows = 16;

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "rms_norm: fp32 only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: weight must match the last dimension");
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const int64_t dim = x.size(-1), rows = dim == 0 ? 0 : xc.numel() / dim;
  auto out = torch::empty_like(xc);
  const float* src = xc.data_ptr<float>();
  const float* w = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(src + r * dim, w, eps, dim, dst + r * dim);
  });
  return out;
}

// x: (B, T, heads, head_dim), any strides with the last one 1 (a slice of the
// fused QKV projection); cos, sin: (B, T, head_dim) contiguous, one angle set
// per token. Returns a new contiguous (B, T, heads, head_dim).
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat,
              "rope: fp32 only");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x must be (B, T, heads, head_dim) with contiguous rows");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rope: head_dim must be even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
              cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T && cos.size(2) == D,
              "rope: cos and sin must be contiguous (B, T, head_dim)");
  auto out = torch::empty({B, T, H, D}, x.options());
  const float* src = x.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  at::parallel_for(0, B * T, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      for (int64_t h = 0; h < H; ++h)
        rotate_row(src + b * sb + t * st + h * sh, c + bt * D, s + bt * D, dst + (bt * H + h) * D, D / 2);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "weight * x / sqrt(mean(x^2) + eps) over the last dimension, fp32");
  m.def("rope", &rope, "rotary embedding of (B, T, heads, head_dim) fp32 by per-token cos and sin (B, T, head_dim)");
}
