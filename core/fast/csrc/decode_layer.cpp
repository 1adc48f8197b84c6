// One transformer layer of a decoding step in one call (see core/fast/fused_layers.py
// for where it is used and why), for one new token per sequence (B <= 8), or for
// GPT-2 a few new tokens of each (B T <= 8: speculative decoding's verifying pass):
//
//   GPT-2, weights as panels (panels.h):
//     x1 = x + proj(attention(qkv(LayerNorm1(x))))
//     x2 = x1 + fc2(GELU(fc(LayerNorm2(x1))))
//   Llama, weights as GGUF blocks (gguf_blocks.h):
//     x1 = x + o(attention(rotate(qkv(RMSNorm1(x)))))        grouped-query heads
//     x2 = x1 + down(silu(gate(h)) * up(h)),  h = RMSNorm2(x1)
//
// with the new keys and values written into the cache and attention over it.
// The products are the kernels the single-layer bindings use; the rest is a
// few thousand numbers per layer, done here in plain loops instead of
// twenty-odd torch calls whose dispatch, at one token, costs more than their
// arithmetic.
//
// Rounding: LayerNorm's mean and variance are summed in double, RMSNorm and
// the rotation are fused_ops.h's, the softmax, GELU and SiLU use an
// exponential accurate to a few units in the last place, so a layer agrees
// with torch's modules to fp32 rounding (tested), not bit for bit.

#include "fused_ops.h"
#include "gguf_blocks.h"
#include "panels.h"

#include <cmath>

namespace {

using namespace panel_kernels;

// exp(x) for x <= 0 (the softmax and sigmoid below only need that range): x = n ln 2 + r with
// |r| <= ln 2 / 2, exp(r) by its Taylor polynomial to degree 7 (relative error
// below 2e-8), times 2^n by scalef. Below -87 the result is 0, as fp32's exp underflows.
inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

inline __mmask16 live_lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

void layer_norm(const float* x, const float* w, const float* b, double eps, int64_t d, float* out) {
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < d; ++i) sum += x[i];
  const double mean = sum / d;
  for (int64_t i = 0; i < d; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float m = static_cast<float>(mean), rstd = static_cast<float>(1.0 / std::sqrt(sq / d + eps));
  for (int64_t i = 0; i < d; ++i) out[i] = (x[i] - m) * rstd * w[i] + b[i];
}

// sigmoid(t) = 1 / (1 + exp(-t)) for t >= 0 and exp(t) / (1 + exp(t)) below, so exp only
// sees non-positive arguments.
inline __m512 sigmoid(__m512 t) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(t)));
  const __mmask16 neg = _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_div_ps(_mm512_mask_blend_ps(neg, one, e), _mm512_add_ps(one, e));
}

// GELU, tanh form: 0.5 x (1 + tanh(y)) = x * sigmoid(2 y), y = sqrt(2 / pi) (x + 0.044715 x^3).
void gelu(float* x, int64_t n) {
  const __m512 c = _mm512_set1_ps(2 * 0.7978845608028654f), k = _mm512_set1_ps(0.044715f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = live_lanes(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    const __m512 y2 = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(k, v), _mm512_mul_ps(v, v), v));
    _mm512_mask_storeu_ps(x + i, live, _mm512_mul_ps(v, sigmoid(y2)));
  }
}

// SwiGLU's gate: g = silu(g) * u = g * sigmoid(g) * u.
void silu_times(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = live_lanes(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(live, g + i);
    _mm512_mask_storeu_ps(g + i, live, _mm512_mul_ps(_mm512_mul_ps(v, sigmoid(v)), _mm512_maskz_loadu_ps(live, u + i)));
  }
}

// sum_j weights[j] values[j] into out, times inv, for the first `width` (<= 16 C) of each
// value row (S rows, `stride` apart): one pass over the rows in order, C accumulators side by
// side, so the rows are read as they lie and each output lane sums over j in order.
template <int C>
void weighted_rows(const float* weights, const float* values, int64_t S, int64_t stride, int64_t width, float inv,
                   float* out) {
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; ++j) {
    const __m512 w = _mm512_set1_ps(weights[j]);
    for (int c = 0; c < C; ++c)
      acc[c] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(live_lanes(width - 16 * c), values + j * stride + 16 * c),
                               acc[c]);
  }
  for (int c = 0; c < C; ++c)
    _mm512_mask_storeu_ps(out + 16 * c, live_lanes(width - 16 * c), _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
}

// One query against the cached keys and values of one sequence and head. Four keys are
// scored at a time, each with its own accumulator, so the four sums run side by side
// instead of waiting on one another.
void attend(const float* q, const float* keys, const float* values, int64_t S, int64_t D, const bool* mask,
            float* scores, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t chunks = (D + 15) / 16;
  int64_t j = 0;
  for (; j + 4 <= S; j += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 live = live_lanes(D - 16 * c);
      const __m512 qc = _mm512_maskz_loadu_ps(live, q + 16 * c);
      for (int t = 0; t < 4; ++t)
        acc[t] = _mm512_fmadd_ps(qc, _mm512_maskz_loadu_ps(live, keys + (j + t) * D + 16 * c), acc[t]);
    }
    for (int t = 0; t < 4; ++t) scores[j + t] = _mm512_reduce_add_ps(acc[t]) * scale;
  }
  for (; j < S; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 live = live_lanes(D - 16 * c);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, q + 16 * c), _mm512_maskz_loadu_ps(live, keys + j * D + 16 * c), acc);
    }
    scores[j] = _mm512_reduce_add_ps(acc) * scale;
  }
  float top = -INFINITY;
  for (j = 0; j < S; ++j) {
    if (mask != nullptr && !mask[j]) scores[j] = -INFINITY;
    top = std::max(top, scores[j]);
  }
  float total = 0;
  for (j = 0; j < S; j += 16) {
    const __mmask16 live = live_lanes(S - j);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + j), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(scores + j, live, e);
    total += _mm512_mask_reduce_add_ps(live, e);
  }
  const float inv = 1.0f / total;
  switch (chunks) {
    case 1: weighted_rows<1>(scores, values, S, D, D, inv, out); break;
    case 2: weighted_rows<2>(scores, values, S, D, D, inv, out); break;
    case 3: weighted_rows<3>(scores, values, S, D, D, inv, out); break;
    case 4: weighted_rows<4>(scores, values, S, D, D, inv, out); break;
    case 5: weighted_rows<5>(scores, values, S, D, D, inv, out); break;
    case 6: weighted_rows<6>(scores, values, S, D, D, inv, out); break;
    case 7: weighted_rows<7>(scores, values, S, D, D, inv, out); break;
    case 8: weighted_rows<8>(scores, values, S, D, D, inv, out); break;
    default:  // heads wider than 128: 128 values at a time
      for (int64_t i = 0; i < D; i += 128)
        weighted_rows<8>(scores, values + i, S, D, std::min<int64_t>(128, D - i), inv, out + i);
  }
}

const float* data_or_null(const c10::optional<torch::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, what, " must be ", n,
              " contiguous fp32 values");
  return t->data_ptr<float>();
}

const float* fp32_vector(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what, " must be ", n,
              " contiguous fp32 values");
  return t.data_ptr<float>();
}

// A weight held as GGUF blocks: {qs, d} (Q8_0) or {qs, d, m} (Q4_1), as core.fast.gguf_matvec splits them.
void blocks_product(const float* x, int64_t M, int64_t K, const std::vector<torch::Tensor>& w, int64_t N, float* out,
                    const char* what) {
  TORCH_CHECK(w.size() == 2 || w.size() == 3, what, ": blocks are (qs, d) or (qs, d, m)");
  TORCH_CHECK(w[0].dim() == 2 && w[0].size(0) == N, what, ": ", N, " rows of blocks expected, got ", w[0].sizes());
  const c10::optional<torch::Tensor> m = w.size() == 3 ? c10::optional<torch::Tensor>(w[2]) : c10::nullopt;
  const at::Half* mp = w.size() == 3 ? w[2].data_ptr<at::Half>() : nullptr;
  if (w.size() == 3) {
    gguf_kernels::check_blocks<gguf_kernels::Q4_1>(w[0], w[1], m, K, what);
    gguf_kernels::product<gguf_kernels::Q4_1>(x, M, K, w[0].data_ptr<uint8_t>(), w[1].data_ptr<at::Half>(), mp, N, out);
  } else {
    gguf_kernels::check_blocks<gguf_kernels::Q8_0>(w[0], w[1], m, K, what);
    gguf_kernels::product<gguf_kernels::Q8_0>(x, M, K, w[0].data_ptr<uint8_t>(), w[1].data_ptr<at::Half>(), mp, N, out);
  }
}

void check_cache(const torch::Tensor& keys, const torch::Tensor& values, int64_t B, int64_t kv_heads, int64_t D,
                 int64_t S) {
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.is_contiguous() && values.is_contiguous() &&
              keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat && keys.size(0) == B &&
              keys.size(1) == kv_heads && keys.size(3) == D,
              "keys and values must be contiguous fp32 (B, kv_heads, capacity, head_dim) caches, got ", keys.sizes());
  TORCH_CHECK(S >= 1 && S <= keys.size(2), "KV cache overflow: ", S, " tokens > capacity ", keys.size(2));
}

const bool* key_mask_data(const c10::optional<torch::Tensor>& key_mask, int64_t B, int64_t S) {
  if (!key_mask.has_value()) return nullptr;
  TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->is_contiguous() && key_mask->dim() == 2 &&
              key_mask->size(0) == B && key_mask->size(1) == S, "key_mask must be a contiguous bool (", B, " rows, ", S, ") tensor");
  return key_mask->data_ptr<bool>();
}

// Writes the new keys and values (rows of qkv, after the query heads) into the cache, then
// attends: query head h reads key/value head h / (heads / kv_heads) (grouped-query attention).
// Row r = b T + t is sequence b's token t, at position length + t: it sees the cache up to
// and including its own position (causal), and where mask is given only the keys its row
// of mask (B T rows of length + T) allows.
void cache_and_attend(const float* qkv, int64_t B, int64_t T, int64_t heads, int64_t kv_heads, int64_t D,
                      torch::Tensor& keys, torch::Tensor& values, int64_t length, const bool* mask, float* out) {
  const int64_t capacity = keys.size(2), S = length + T, width = (heads + 2 * kv_heads) * D;
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t g = 0; g < kv_heads; ++g) {
      const float* row = qkv + r * width;
      const int64_t at = ((r / T * kv_heads + g) * capacity + length + r % T) * D;
      std::copy_n(row + (heads + g) * D, D, kp + at);
      std::copy_n(row + (heads + kv_heads + g) * D, D, vp + at);
    }
  at::parallel_for(0, B * T * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / heads, h = job % heads, g = h / (heads / kv_heads);
      const int64_t cache_row = (r / T * kv_heads + g) * capacity * D;
      attend(qkv + r * width + h * D, kp + cache_row, vp + cache_row, length + r % T + 1, D,
             mask == nullptr ? nullptr : mask + r * S, scores.data(), out + (r * heads + h) * D);
    }
  });
}

torch::Tensor gpt2_layer(const torch::Tensor& x, const torch::Tensor& ln1_w, const torch::Tensor& ln1_b, double eps1,
                         const std::vector<torch::Tensor>& qkv_w, const c10::optional<torch::Tensor>& qkv_b,
                         const std::vector<torch::Tensor>& proj_w, const c10::optional<torch::Tensor>& proj_b,
                         const torch::Tensor& ln2_w, const torch::Tensor& ln2_b, double eps2,
                         const std::vector<torch::Tensor>& fc_w, const c10::optional<torch::Tensor>& fc_b,
                         const std::vector<torch::Tensor>& fc2_w, const c10::optional<torch::Tensor>& fc2_b,
                         torch::Tensor keys, torch::Tensor values, int64_t length, int64_t n_heads,
                         const c10::optional<torch::Tensor>& key_mask) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous (B, T, d) fp32 tensor");
  const int64_t T = x.size(1), d = x.size(2), B = x.size(0) * T;  // from here on, B counts rows
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "x must have 1 to ", kMaxRows, " rows (sequences x new tokens), got ", B);
  TORCH_CHECK(n_heads >= 1 && d % n_heads == 0, "d = ", d, " is not a multiple of ", n_heads, " heads");
  const int64_t D = d / n_heads;
  check_cache(keys, values, x.size(0), n_heads, D, length + T);
  TORCH_CHECK(!fc2_w.empty(), "fc2: a weight is [panels] or [int8 panels, scales]");
  const int64_t ff_dim = fc2_w[0].size(1);
  const PanelWeight qkv = check_panels(qkv_w, d, 3 * d, "qkv"), proj = check_panels(proj_w, d, d, "proj");
  const PanelWeight fc = check_panels(fc_w, d, ff_dim, "fc"), fc2 = check_panels(fc2_w, ff_dim, d, "fc2");
  const bool* mask = key_mask_data(key_mask, B, length + T);
  const float* w1 = fp32_vector(ln1_w, d, "ln1 weight");
  const float* b1 = fp32_vector(ln1_b, d, "ln1 bias");
  const float* w2 = fp32_vector(ln2_w, d, "ln2 weight");
  const float* b2 = fp32_vector(ln2_b, d, "ln2 bias");

  const float* xp = x.data_ptr<float>();
  auto out = torch::empty_like(x);
  float* op = out.data_ptr<float>();
  std::vector<float> h(B * d), q(B * 3 * d), a(B * d), f(B * ff_dim);
  for (int64_t r = 0; r < B; ++r) layer_norm(xp + r * d, w1, b1, eps1, d, h.data() + r * d);
  product(h.data(), B, d, qkv, data_or_null(qkv_b, 3 * d, "qkv bias"), q.data(), 3 * d);
  cache_and_attend(q.data(), x.size(0), T, n_heads, n_heads, D, keys, values, length, mask, a.data());
  product(a.data(), B, d, proj, data_or_null(proj_b, d, "proj bias"), op, d);
  for (int64_t i = 0; i < B * d; ++i) op[i] += xp[i];  // x1, in out
  for (int64_t r = 0; r < B; ++r) layer_norm(op + r * d, w2, b2, eps2, d, h.data() + r * d);
  product(h.data(), B, d, fc, data_or_null(fc_b, ff_dim, "fc bias"), f.data(), ff_dim);
  gelu(f.data(), B * ff_dim);
  product(f.data(), B, ff_dim, fc2, data_or_null(fc2_b, d, "fc2 bias"), a.data(), d);
  for (int64_t i = 0; i < B * d; ++i) op[i] += a[i];  // x2
  return out;
}

torch::Tensor llama_layer(const torch::Tensor& x, const torch::Tensor& norm1, double eps1,
                          const std::vector<torch::Tensor>& qkv_w, const std::vector<torch::Tensor>& o_w,
                          const torch::Tensor& norm2, double eps2, const std::vector<torch::Tensor>& gate_w,
                          const std::vector<torch::Tensor>& up_w, const std::vector<torch::Tensor>& down_w,
                          torch::Tensor keys, torch::Tensor values, int64_t length, int64_t heads, int64_t kv_heads,
                          const torch::Tensor& cos, const torch::Tensor& sin,
                          const c10::optional<torch::Tensor>& key_mask) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous (B, 1, d) fp32 tensor");
  const int64_t B = x.size(0), d = x.size(2);
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "x must have 1 to ", kMaxRows, " sequences, got ", B);
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, heads, " query heads do not share ", kv_heads, " key/value heads");
  const int64_t D = keys.size(3), width = (heads + 2 * kv_heads) * D, ff = gate_w[0].size(0);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even for the rotation");
  check_cache(keys, values, B, kv_heads, D, length + 1);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == B * D && sin.numel() == B * D,
              "cos and sin must be contiguous fp32 (B, head_dim), one angle set per sequence");
  const bool* mask = key_mask_data(key_mask, B, length + 1);
  const float* xp = x.data_ptr<float>();
  const float* n1 = fp32_vector(norm1, d, "norm1 weight");
  const float* n2 = fp32_vector(norm2, d, "norm2 weight");
  auto out = torch::empty_like(x);
  float* op = out.data_ptr<float>();
  std::vector<float> h(B * std::max(d, heads * D)), qkv(B * width), a(B * heads * D), g(B * ff), u(B * ff);
  for (int64_t r = 0; r < B; ++r) fused_rows::rms_norm_row(xp + r * d, n1, eps1, d, h.data() + r * d);
  blocks_product(h.data(), B, d, qkv_w, width, qkv.data(), "qkv");
  // Queries and keys turn by the token's angles (fused_ops.h: rounded as core.model.layers.apply_rope).
  std::vector<float> turned(D);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t head = 0; head < heads + kv_heads; ++head) {
      float* v = qkv.data() + r * width + head * D;
      fused_rows::rotate_row(v, cos.data_ptr<float>() + r * D, sin.data_ptr<float>() + r * D, turned.data(), D / 2);
      std::copy_n(turned.data(), D, v);
    }
  cache_and_attend(qkv.data(), B, 1, heads, kv_heads, D, keys, values, length, mask, a.data());
  blocks_product(a.data(), B, heads * D, o_w, d, op, "o_proj");
  for (int64_t i = 0; i < B * d; ++i) op[i] += xp[i];  // x1, in out
  for (int64_t r = 0; r < B; ++r) fused_rows::rms_norm_row(op + r * d, n2, eps2, d, h.data() + r * d);
  blocks_product(h.data(), B, d, gate_w, ff, g.data(), "gate");
  blocks_product(h.data(), B, d, up_w, ff, u.data(), "up");
  silu_times(g.data(), u.data(), B * ff);
  blocks_product(g.data(), B, ff, down_w, d, a.data(), "down");
  for (int64_t i = 0; i < B * d; ++i) op[i] += a[i];  // x2
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("llama_layer", &llama_layer, "one Llama layer from GGUF blocks for one new token per sequence (B <= 8), KV cache written in place");
  m.def("gpt2_layer", &gpt2_layer, "one GPT-2 layer for T new tokens of B sequences (B T <= 8), weights as panels (fp32, bf16 or int8), KV cache written in place");
  m.attr("max_rows") = kMaxRows;
}
