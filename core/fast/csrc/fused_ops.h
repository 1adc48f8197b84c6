// The row functions of fused_ops.cpp (RMSNorm, rotary embedding), shared with
// decode_layer.cpp, which runs them inside a whole Llama layer.

#pragma once

#include <cmath>
#include <cstdint>

namespace fused_rows {

// weight * (x * (1 / sqrt(mean(x^2) + eps))) for one row of dim numbers.
inline void rms_norm_row(const float* row, const float* w, double eps, int64_t dim, float* o) {
  // Sixteen partial sums (one AVX-512 register after vectorisation), then their total.
  float partial[16] = {0};
  int64_t k = 0;
  for (; k + 16 <= dim; k += 16)
    for (int j = 0; j < 16; ++j) partial[j] += row[k + j] * row[k + j];
  for (; k < dim; ++k) partial[k % 16] += row[k] * row[k];
  float sum = 0.f;
  for (int j = 0; j < 16; ++j) sum += partial[j];
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
  for (k = 0; k < dim; ++k) o[k] = w[k] * (row[k] * scale);
}

// One head's rotation. Two roundings per output, as torch's separate multiply and add do.
__attribute__((optimize("fp-contract=off")))
inline void rotate_row(const float* x, const float* cos, const float* sin, float* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i] * cos[i];
    const float b = -x[i + half] * sin[i];
    out[i] = a + b;
  }
  for (int64_t i = half; i < 2 * half; ++i) {
    const float a = x[i] * cos[i];
    const float b = x[i - half] * sin[i];
    out[i] = a + b;
  }
}

}  // namespace fused_rows
