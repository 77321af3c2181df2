// torch.ops.uio_cpu.scaled_cross_entropy: -log softmax(logits / divisor)[target] for each float32 row
// of logits, as F.cross_entropy(logits / divisor, targets, reduction="none") computes it, in two
// passes over each row (its largest logit; its sum of exponentials), writing nothing but the losses.
//
// Scoring answer options takes the output layer's logits at every position an option counts (a
// few hundred thousand numbers each): torch's division writes them again, and its log-softmax once
// more before the targets are picked; on a 2-core AMD EPYC those two took ~0.13 s of ranking 200
// labels.
#include <torch/library.h>

#include <cmath>

#include "cpu_kernels.h"

namespace {

using namespace uio_cpu;

float row_max(const float* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(x + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, best);
  float result = *std::max_element(lanes, lanes + 8);
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

// sum_i exp(x_i / divisor - shift), each x_i / divisor rounded to float32 first (as torch divides);
// NaN if some x_i - shift is (exp8 would clamp it to a number).
float sum_of_exponentials(const float* x, int64_t n, float divisor, float shift) {
  const __m256 d = _mm256_set1_ps(divisor), s = _mm256_set1_ps(shift);
  __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // two sums: exp8's latency overlaps
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int m = 0; m < 2; ++m) {
      __m256 shifted = _mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(x + i + 8 * m), d), s);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(shifted, shifted, _CMP_UNORD_Q));
      total[m] = _mm256_add_ps(total[m], exp8(shifted));
    }
  }
  float result = horizontal_sum(_mm256_add_ps(total[0], total[1]));
  for (; i < n; ++i) result += std::exp(x[i] / divisor - shift);
  return _mm256_movemask_ps(nan) ? NAN : result;
}

at::Tensor scaled_cross_entropy(const at::Tensor& logits, const at::Tensor& targets, double divisor) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0,
              "scaled_cross_entropy: logits must be a contiguous float32 (rows, classes) tensor");
  TORCH_CHECK(divisor > 0, "scaled_cross_entropy: divisor must be positive, got ", divisor);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "scaled_cross_entropy: targets must be int64, one per row of logits");
  int64_t rows = logits.size(0), classes = logits.size(1);
  at::Tensor picked = targets.contiguous();
  const int64_t* target = picked.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(0 <= target[r] && target[r] < classes, "scaled_cross_entropy: target ", target[r],
                " out of range for ", classes, " classes");
  }
  at::Tensor losses = at::empty({rows}, logits.options());
  const float* x = logits.data_ptr<float>();
  float* out = losses.data_ptr<float>();
  float d = static_cast<float>(divisor);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = x + r * classes;
      // Dividing by a positive number keeps the order (rounding too): the largest quotient is the
      // largest logit's.
      float shift = row_max(row, classes) / d;
      float log_sum = std::log(sum_of_exponentials(row, classes, d, shift));
      out[r] = -((row[target[r]] / d - shift) - log_sum);
    }
  });
  return losses;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uio_cpu, m) {
  m.def("scaled_cross_entropy(Tensor logits, Tensor targets, float divisor) -> Tensor");
  m.impl("scaled_cross_entropy", c10::DispatchKey::CPU, &scaled_cross_entropy);
}
