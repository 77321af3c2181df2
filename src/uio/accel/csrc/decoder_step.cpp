// torch.ops.uio_cpu.decoder_layer_step: a whole decoder layer for a decoding step's few float32 or
// bfloat16 rows.
//
// In torch such a layer is ~60 operations, most on a few hundred numbers, and each costs more to
// dispatch than to compute: on a 2-core CPU a third of a step of `small` went to them. Here the
// layer is one call: its six matrix products (cpu_kernels.h) and, between them, the norms, the
// attention over the cached and the encoder's keys, and the gated GELU, in the reference's
// arithmetic (float32; exp and tanh within a few ulp). In bfloat16 it computes in float32 and rounds
// to bfloat16 wherever torch's bf16 layer does (each operation's output), so it reads half the bytes
// of float32 and gives torch's bf16 results up to float32 rounding before each rounding. Its key/value
// caches may then be bfloat16 too (those values are bf16 values): attention reads half the bytes.
#include <torch/library.h>

#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace uio_cpu;

// Float32 rounded to the nearest bfloat16 (ties to even), as torch converts; NaN stays NaN.
inline __m256 round_to_bf16(__m256 v) {
  __m256i bits = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
  __m256 result = _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return _mm256_blendv_ps(result, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

inline float round_to_bf16(float v) {
  if (std::isnan(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Each of `n` values rounded to bfloat16, where `half` (bf16 layers); float32 layers keep them.
void round_if(bool half, float* values, int64_t n) {
  if (!half) return;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(values + i, round_to_bf16(_mm256_loadu_ps(values + i)));
  for (; i < n; ++i) values[i] = round_to_bf16(values[i]);
}

// T5's RMS norm of each row: x / sqrt(mean(x^2) + eps) * weight.
void rms_norm(const float* x, int64_t rows, int64_t dim, const float* weight, double eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float squares = 0.0f;
    for (int64_t i = 0; i < dim; ++i) squares += xr[i] * xr[i];
    float scale = 1.0f / std::sqrt(squares / static_cast<float>(dim) + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = xr[i] * scale * weight[i];
  }
}

// The reference's masked logits (bias -1e10) get exactly 0 weight whenever a key is not masked: they
// are left out. (A row with every key masked attends to all of them uniformly, as in the reference.)
constexpr float kMasked = -1e9f;

// Attention reads each key and value once, from memory (a step streams ~100 MB of weights between
// two visits of a layer's cache), with a few FMAs per number: the hardware prefetcher alone keeps
// too few reads in flight. Asking for the key or value this many positions ahead made cross-attention
// ~20% faster on a 2-core AMD EPYC (2, 4, 8 and 16 gave the same).
constexpr int64_t kPrefetchKeys = 8;

// Ask for the cache lines holding `bytes` from `row`.
inline void prefetch(const void* row, int64_t bytes) {
  auto first = reinterpret_cast<uintptr_t>(row) & ~uintptr_t{63}, end = reinterpret_cast<uintptr_t>(row) + bytes;
  for (uintptr_t line = first; line < end; line += 64) _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
}

// A float32 or bfloat16 tensor's elements (bfloat16 as their bits).
template <typename K>
K* elements(const at::Tensor& t) {
  if constexpr (std::is_same_v<K, float>) {
    return t.data_ptr<float>();
  } else {
    return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
  }
}

// `n` float32 values stored as K: copied, or (bfloat16 caches, of a bf16 layer's values, which are
// rounded to bfloat16 already) their upper halves, exactly.
inline void store(const float* values, int64_t n, float* to) { std::memcpy(to, values, n * sizeof(float)); }
inline void store(const float* values, int64_t n, uint16_t* to) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, values + i, sizeof bits);
    to[i] = static_cast<uint16_t>(bits >> 16);
  }
}

// logits[j] = q . k_j + bias_j for `length` keys of `dim` values (float32 or bfloat16: K), four keys
// at a time (independent sums); -inf for masked keys unless `all`. Returns whether some key is not masked.
template <typename K>
bool attention_logits(const float* q, const K* k, const float* bias, int64_t bias_stride, int64_t length,
                      int64_t dim, bool all, float* logits) {
  int64_t vector_end = dim - dim % 8, computed = 0;
  int64_t keys[4];
  auto flush = [&](int64_t count) {  // the logits of keys[0..count)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < vector_end; i += 8) {
      __m256 qi = _mm256_loadu_ps(q + i);
      for (int64_t m = 0; m < 4; ++m) {
        if (m < count) acc[m] = _mm256_fmadd_ps(qi, load8(k + keys[m] * dim + i), acc[m]);
      }
    }
    for (int64_t m = 0; m < count; ++m) {
      float sum = horizontal_sum(acc[m]);
      for (int64_t i = vector_end; i < dim; ++i) sum += q[i] * value(k[keys[m] * dim + i]);
      logits[keys[m]] = sum + bias[keys[m] * bias_stride];
    }
  };
  int64_t pending = 0;
  for (int64_t j = 0; j < length; ++j) {
    if (!all && bias[j * bias_stride] <= kMasked) {
      logits[j] = -INFINITY;
      continue;
    }
    if (j + kPrefetchKeys < length) prefetch(k + (j + kPrefetchKeys) * dim, dim * sizeof(K));
    keys[pending++] = j;
    ++computed;
    if (pending == 4) {
      flush(4);
      pending = 0;
    }
  }
  flush(pending);
  return computed > 0;
}

// out = softmax_j(q . k_j + bias_j) v_j over `length` keys of `dim` values (unscaled, as the reference);
// `logits` has room for `length` rounded up to 8.
template <typename K>
void attend_one(const float* q, const K* k, const K* v, const float* bias, int64_t bias_stride,
                int64_t length, int64_t dim, float* logits, float* out) {
  if (!attention_logits(q, k, bias, bias_stride, length, dim, false, logits)) {
    attention_logits(q, k, bias, bias_stride, length, dim, true, logits);
  }
  float largest = *std::max_element(logits, logits + length);
  int64_t padded = (length + 7) / 8 * 8;
  std::fill(logits + length, logits + padded, -INFINITY);
  __m256 total = _mm256_setzero_ps(), shift = _mm256_set1_ps(largest);
  for (int64_t j = 0; j < padded; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(logits + j), shift));
    _mm256_storeu_ps(logits + j, e);
    total = _mm256_add_ps(total, e);
  }
  float inverse = 1.0f / horizontal_sum(total);
  // The weighted sum of the values, 64 of their columns at a time in registers.
  for (int64_t c = 0; c < dim; c += 64) {
    int64_t width = std::min<int64_t>(64, dim - c), vectors = width / 8;
    __m256 acc[8];
    for (int m = 0; m < 8; ++m) acc[m] = _mm256_setzero_ps();
    float tail[8] = {0};
    for (int64_t j = 0; j < length; ++j) {
      float weight = logits[j];
      if (weight == 0.0f) continue;  // masked keys
      const K* vj = v + j * dim + c;
      if (j + kPrefetchKeys < length) prefetch(vj + kPrefetchKeys * dim, width * sizeof(K));
      __m256 w = _mm256_set1_ps(weight);
      for (int m = 0; m < 8; ++m) {
        if (m < vectors) acc[m] = _mm256_fmadd_ps(w, load8(vj + 8 * m), acc[m]);
      }
      for (int64_t i = vectors * 8; i < width; ++i) tail[i - vectors * 8] += weight * value(vj[i]);
    }
    for (int m = 0; m < vectors; ++m) _mm256_storeu_ps(out + c + 8 * m, _mm256_mul_ps(acc[m], _mm256_set1_ps(inverse)));
    for (int64_t i = vectors * 8; i < width; ++i) out[c + i] = tail[i - vectors * 8] * inverse;
  }
}

// Attention of q (rows, heads * dim; row stride ldq) over keys/values (rows / sharing, heads, length,
// dim; float32 or bfloat16: K), where each key row serves `sharing` consecutive query rows (an
// example's beams), with `bias` (rows / sharing, heads, 1, length; any strides) added to the logits
// -> out (rows, heads * dim).
template <typename K>
void attention(const float* q, int64_t ldq, int64_t rows, const at::Tensor& keys, const at::Tensor& values,
               const at::Tensor& bias, float* out) {
  int64_t heads = keys.size(1), length = keys.size(2), dim = keys.size(3);
  int64_t sharing = rows / keys.size(0), pairs = rows * heads;
  const K *kp = elements<K>(keys), *vp = elements<K>(values);
  const float* bp = bias.data_ptr<float>();
  int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pairs)));
  std::vector<float> scratch(threads * ((length + 7) / 8 * 8));
#pragma omp parallel num_threads(threads)
  {
    float* logits = scratch.data() + omp_get_thread_num() * ((length + 7) / 8 * 8);
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      // The rows sharing keys one after the other: the same keys, from this core's cache.
      int64_t kr = pair / (heads * sharing), h = pair / sharing % heads, r = kr * sharing + pair % sharing;
      int64_t offset = (kr * heads + h) * length * dim;
      attend_one(q + r * ldq + h * dim, kp + offset, vp + offset, bp + kr * bias.stride(0) + h * bias.stride(1),
                 bias.stride(3), length, dim, logits, out + r * heads * dim + h * dim);
    }
  }
}

// attention over float32 or bfloat16 keys and values, as they are
void attend(const float* q, int64_t ldq, int64_t rows, const at::Tensor& keys, const at::Tensor& values,
            const at::Tensor& bias, float* out) {
  if (keys.scalar_type() == at::kBFloat16) {
    attention<uint16_t>(q, ldq, rows, keys, values, bias, out);
  } else {
    attention<float>(q, ldq, rows, keys, values, bias, out);
  }
}

// This step's keys and values (rows of [q | k | v], each heads * dim wide) written at `position`.
template <typename K>
void write_step(const float* projected, int64_t rows, int64_t position, const at::Tensor& keys,
                const at::Tensor& values) {
  int64_t heads = keys.size(1), length = keys.size(2), dim = keys.size(3), inner = heads * dim;
  K *kp = elements<K>(keys), *vp = elements<K>(values);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      int64_t at = ((r * heads + h) * length + position) * dim;
      store(projected + r * 3 * inner + inner + h * dim, dim, kp + at);
      store(projected + r * 3 * inner + 2 * inner + h * dim, dim, vp + at);
    }
  }
}

// y[r, :] += x[r, :] @ weight.T (the product, then the sum, rounded where `half`)
void add_product(const float* x, int64_t rows, const at::Tensor& weight, float* scratch, float* y, bool half) {
  int64_t n = rows * weight.size(0);
  product(x, weight.size(1), rows, weight, scratch);
  round_if(half, scratch, n);
  for (int64_t i = 0; i < n; ++i) y[i] += scratch[i];
  round_if(half, y, n);
}

// gelu(gate) * up (tanh approximation) for rows of [gate | up], each `hidden` wide; where `half`,
// gelu(gate) and the product rounded to bfloat16, as torch's two bf16 operations round them.
void gated_gelu(const float* gate_up, int64_t rows, int64_t hidden, float* out, bool half) {
  const __m256 beta = _mm256_set1_ps(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm256_set1_ps(0.044715f);
  const __m256 halves = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float *gate = gate_up + r * 2 * hidden, *up = gate + hidden;
    float* o = out + r * hidden;
    int64_t i = 0;
    for (; i + 8 <= hidden; i += 8) {
      __m256 x = _mm256_loadu_ps(gate + i);
      __m256 inner = _mm256_mul_ps(beta, _mm256_fmadd_ps(kappa, _mm256_mul_ps(_mm256_mul_ps(x, x), x), x));
      // tanh(u) = sign(u) (1 - e^-2|u|) / (1 + e^-2|u|)
      __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, inner)));
      __m256 t = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)), _mm256_and_ps(sign, inner));
      __m256 gelu = _mm256_mul_ps(_mm256_mul_ps(halves, x), _mm256_add_ps(one, t));
      if (half) gelu = round_to_bf16(gelu);
      _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(up + i)));
    }
    for (; i < hidden; ++i) {
      float x = gate[i], inner = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5) * (x + 0.044715f * x * x * x);
      float gelu = 0.5f * x * (1.0f + std::tanh(inner));
      o[i] = (half ? round_to_bf16(gelu) : gelu) * up[i];
    }
  }
  round_if(half, out, rows * hidden);
}

// torch.ops.uio_cpu.gated_gelu: gelu(gate) * up for float32 rows of [gate | up] (the MLP's fused
// input projection) of any number, in one pass over them on torch's threads (torch's gelu and mul
// each make a pass, and write a tensor, of their own).
at::Tensor gated_gelu_rows(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0 &&
                  gate_up.is_contiguous(),
              "gated_gelu: gate_up must be a contiguous float32 tensor with an even last dimension");
  int64_t hidden = gate_up.size(-1) / 2, rows = hidden ? gate_up.numel() / (2 * hidden) : 0;
  std::vector<int64_t> shape = gate_up.sizes().vec();
  shape.back() = hidden;
  at::Tensor out = at::empty(shape, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    gated_gelu(in + r0 * 2 * hidden, r1 - r0, hidden, o + r0 * hidden, false);
  });
  return out;
}

void check_weight(const at::Tensor& w, int64_t out, int64_t in, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == out && w.size(1) == in, "decoder_layer_step: ", name, " must be (",
              out, ", ", in, "), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == dtype && (w.stride(0) == 1 || w.stride(1) == 1), "decoder_layer_step: ",
              name, " must be ", dtype, " (as x) with contiguous rows or columns");
}

void check_cache(const at::Tensor& t, int64_t rows, int64_t heads, int64_t dim, at::ScalarType dtype,
                 const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "decoder_layer_step: ", name, " must be ", dtype, " (as the keys)");
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous() && t.size(0) > 0 &&
                  rows % t.size(0) == 0 && t.size(1) == heads && t.size(3) == dim,
              "decoder_layer_step: ", name, " must be contiguous, of shape (", rows, " or a divisor of it, ",
              heads, ", length, ", dim, "), got ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

at::Tensor decoder_layer_step(const at::Tensor& x_in, const at::Tensor& self_norm, const at::Tensor& qkv,
                              const at::Tensor& self_out, at::Tensor keys, at::Tensor values, const at::Tensor& index,
                              const at::Tensor& self_bias, const at::Tensor& cross_norm, const at::Tensor& cross_q,
                              const at::Tensor& cross_out, const at::Tensor& cross_keys,
                              const at::Tensor& cross_values, const at::Tensor& cross_bias,
                              const at::Tensor& mlp_norm, const at::Tensor& wi, const at::Tensor& wo, double eps) {
  at::ScalarType dtype = x_in.scalar_type();
  TORCH_CHECK(x_in.dim() >= 1 && (dtype == at::kFloat || dtype == at::kBFloat16),
              "decoder_layer_step: x must be float32 or bfloat16 (..., dim)");
  bool half = dtype == at::kBFloat16;
  int64_t width = x_in.size(-1), rows = width > 0 ? x_in.numel() / width : 0, heads = keys.size(1), dim = keys.size(3);
  int64_t inner = heads * dim, hidden = wo.size(1), length = keys.size(2);
  TORCH_CHECK(rows <= kMaxRows, "decoder_layer_step: at most ", kMaxRows, " rows");
  // bfloat16 caches (a bf16 layer's keys and values are bf16 values) or float32 ones
  at::ScalarType cache_dtype = keys.scalar_type();
  TORCH_CHECK(cache_dtype == at::kFloat || cache_dtype == dtype,
              "decoder_layer_step: caches must be float32 or x's dtype, got ", cache_dtype);
  check_cache(keys, rows, heads, dim, cache_dtype, "keys");
  check_cache(values, rows, heads, dim, cache_dtype, "values");
  check_cache(cross_keys, rows, heads, dim, cache_dtype, "cross_keys");
  check_cache(cross_values, rows, heads, dim, cache_dtype, "cross_values");
  TORCH_CHECK(keys.size(0) == rows && values.sizes() == keys.sizes() && cross_values.sizes() == cross_keys.sizes(),
              "decoder_layer_step: keys and values must match, with a row of keys per row of x");
  check_weight(qkv, 3 * inner, width, dtype, "qkv");
  check_weight(self_out, width, inner, dtype, "self_out");
  check_weight(cross_q, inner, width, dtype, "cross_q");
  check_weight(cross_out, width, inner, dtype, "cross_out");
  check_weight(wi, 2 * hidden, width, dtype, "wi");
  check_weight(wo, width, hidden, dtype, "wo");
  for (const auto* norm : {&self_norm, &cross_norm, &mlp_norm}) {
    TORCH_CHECK(norm->dim() == 1 && norm->size(0) == width && norm->scalar_type() == dtype,
                "decoder_layer_step: norm weights must be (dim,) in x's dtype");
  }
  TORCH_CHECK(index.numel() == 1, "decoder_layer_step: index must hold the step's position");
  int64_t position = index.item<int64_t>();
  TORCH_CHECK(0 <= position && position < length, "decoder_layer_step: position ", position, " outside the cache");
  at::Tensor self_bias4 = self_bias.to(at::kFloat).expand({rows, heads, 1, length});
  at::Tensor cross_bias4 = cross_bias.to(at::kFloat).expand({cross_keys.size(0), heads, 1, cross_keys.size(2)});

  // One allocation for the output and every intermediate (a step runs this for each layer).
  int64_t projected_width = std::max(3 * inner, 2 * hidden);
  at::Tensor memory =
      at::empty({rows * (3 * width + projected_width + inner + hidden)}, x_in.options().dtype(at::kFloat));
  at::Tensor y = memory.narrow(0, 0, rows * width).view(x_in.sizes());
  float* yp = y.data_ptr<float>();
  float *np = yp + rows * width, *sp = np + rows * width, *pp = sp + rows * width;
  float *ap = pp + rows * projected_width, *activated = ap + rows * inner;
  std::memcpy(yp, x_in.to(at::kFloat).contiguous().data_ptr<float>(), rows * width * sizeof(float));
  // The norms' weights in float32 (a bf16 layer's are widened, as torch's norm widens them).
  std::array<at::Tensor, 3> norms = {self_norm, cross_norm, mlp_norm};
  for (auto& norm : norms) {
    if (half || !norm.is_contiguous()) norm = norm.to(at::kFloat).contiguous();
  }

  rms_norm(yp, rows, width, norms[0].data_ptr<float>(), eps, np);
  round_if(half, np, rows * width);
  product(np, width, rows, qkv, pp);
  round_if(half, pp, rows * 3 * inner);
  if (cache_dtype == at::kBFloat16) {
    write_step<uint16_t>(pp, rows, position, keys, values);
  } else {
    write_step<float>(pp, rows, position, keys, values);
  }
  attend(pp, 3 * inner, rows, keys, values, self_bias4, ap);
  round_if(half, ap, rows * inner);
  add_product(ap, rows, self_out, sp, yp, half);

  rms_norm(yp, rows, width, norms[1].data_ptr<float>(), eps, np);
  round_if(half, np, rows * width);
  product(np, width, rows, cross_q, pp);
  round_if(half, pp, rows * inner);
  attend(pp, inner, rows, cross_keys, cross_values, cross_bias4, ap);
  round_if(half, ap, rows * inner);
  add_product(ap, rows, cross_out, sp, yp, half);

  rms_norm(yp, rows, width, norms[2].data_ptr<float>(), eps, np);
  round_if(half, np, rows * width);
  product(np, width, rows, wi, pp);
  round_if(half, pp, rows * 2 * hidden);
  gated_gelu(pp, rows, hidden, activated, half);
  add_product(activated, rows, wo, sp, yp, half);
  return half ? y.to(at::kBFloat16) : y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uio_cpu, m) {
  m.def("decoder_layer_step(Tensor x, Tensor self_norm, Tensor qkv, Tensor self_out, Tensor(a!) keys, "
        "Tensor(b!) values, Tensor index, Tensor self_bias, Tensor cross_norm, Tensor cross_q, Tensor cross_out, "
        "Tensor cross_keys, Tensor cross_values, Tensor cross_bias, Tensor mlp_norm, Tensor wi, Tensor wo, "
        "float eps) -> Tensor");
  m.impl("decoder_layer_step", c10::DispatchKey::CPU, &decoder_layer_step);
  m.def("gated_gelu(Tensor gate_up) -> Tensor");
  m.impl("gated_gelu", c10::DispatchKey::CPU, &gated_gelu_rows);
}
