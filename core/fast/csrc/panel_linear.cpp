// torch's binding of the panel product (panels.h) for one linear layer: see
// core/fast/panels.py.

#include "panels.h"

namespace {

using namespace panel_kernels;

torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& weight,
                     const c10::optional<torch::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "x must have 1 to ", kMaxRows, " rows, got ", M);
  const PanelWeight w = check_panels(weight, K, N, "linear");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  // bf16 inputs are widened here, not by torch's .to(): at one token a torch call costs more
  // than the conversion of a few thousand numbers.
  std::vector<float> bias32, x32;
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(), "bias must be ", N, " contiguous values");
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16, "bias must be fp32 or bf16");
    bp = bias->scalar_type() == at::kFloat ? bias->data_ptr<float>() : widen(bias->data_ptr<at::BFloat16>(), N, bias32);
  }
  const float* xp = x.scalar_type() == at::kFloat ? x.data_ptr<float>() : widen(x.data_ptr<at::BFloat16>(), M * K, x32);
  auto out = torch::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat) product(xp, M, K, w, bp, out.data_ptr<float>(), N);
  else product(xp, M, K, w, bp, out.data_ptr<at::BFloat16>(), N);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x (M <= 8, K) fp32 or bf16 @ W.T + bias, W as [panels (N / 16, K, 16) fp32 or bf16] or [int8 panels, scales]");
  m.attr("max_rows") = kMaxRows;
  m.attr("panel") = kPanel;
}
