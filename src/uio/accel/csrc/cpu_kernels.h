// Shared by uio's CPU kernels: x @ weight.T for a few rows of x with AVX2 and FMA, streaming the
// weight once; float32, or bfloat16 weights widened to float32 in registers (float32 sums).
//
// torch's kernels split such a product over output columns, so each thread reads a strided part
// of every weight row; here each thread streams one contiguous block of the weight (a block of
// input rows for a weight stored (in, out), of output rows for one stored (out, in)), which on a
// 2-core AMD EPYC reads the weights of a decoding step ~1.8x faster.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace uio_cpu {

constexpr int64_t kMaxRows = 32;
// From this many rows on, products share each loaded weight vector between rows (tiles): with more
// rows the loads, not the memory, bound them; with fewer, one weight stream at a time reads faster
// (2 rows: tiles 5-10% slower on a 2-core AMD EPYC).
constexpr int64_t kTiledRows = 4;
// Products with (out, in) weights read this many weight rows at once, one from each of as many
// parts of a thread's block of outputs: the memory then keeps more reads in flight. On a 2-core AMD
// EPYC, the model's products of 1-3 rows took 5-25% less time than a weight row at a time (4 parts:
// the same; 2: about half the gain; neighbouring rows at once: 1.5x slower); of 4-32 rows, in tiles
// of 4 rows x 3 such outputs, 7-35% less than tiles of 8 rows x 1 output (4-16 rows) or of 2 rows x
// 4 neighbouring outputs (17-32).
constexpr int kStreams = 3;
// A tile of 4 rows after the first re-reads its weight rows from cache, leaving the memory idle: that
// tile (or the only one, for 4 rows) asks for the next weight rows meanwhile. On a 2-core AMD EPYC,
// products of 4-16 rows with weight rows of 512 floats or 1024 bfloat16 took 5-25% less time; with
// rows of 2048 floats (8 KB), the same or up to 9% more, so longer rows go without.
constexpr int64_t kPrefetchedRowBytes = 4096;

// Eight weights as float32: loaded, or widened from bfloat16 (its bits are a float32's upper half).
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline float value(float w) { return w; }
inline float value(uint16_t w) {
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// e^x for eight floats: Cephes' single-precision polynomial (within a few ulp); 0 far below -87
// (the reference's masked logits, -1e10, get exactly 0 weight there too).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// y[r, :] += x[r, i..i+3] . w[i..i+3, :] for R (1 or 2) rows at once: each weight vector is loaded
// once for both rows (6 loads per 8 FMAs instead of 10). Every y value gets the same four FMAs in
// the same order either way. (Not inlined, one row took 5-9% longer.)
template <int R, typename W>
__attribute__((always_inline)) inline void accumulate_four_rows(const float* x, int64_t ldx, const W* w, int64_t ldw,
                                                                 int64_t out, int64_t i, float* y) {
  const W *w0 = w + i * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
  int64_t vector_end = out - out % 8;
  __m256 xs[R][4];
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < 4; ++m) xs[r][m] = _mm256_set1_ps(x[r * ldx + i + m]);
  }
  for (int64_t j = 0; j < vector_end; j += 8) {
    __m256 v0 = load8(w0 + j), v1 = load8(w1 + j), v2 = load8(w2 + j), v3 = load8(w3 + j);
    for (int r = 0; r < R; ++r) {
      __m256 acc = _mm256_loadu_ps(y + r * out + j);
      acc = _mm256_fmadd_ps(xs[r][0], v0, acc);
      acc = _mm256_fmadd_ps(xs[r][1], v1, acc);
      acc = _mm256_fmadd_ps(xs[r][2], v2, acc);
      acc = _mm256_fmadd_ps(xs[r][3], v3, acc);
      _mm256_storeu_ps(y + r * out + j, acc);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * ldx + i;
    for (int64_t j = vector_end; j < out; ++j) {
      y[r * out + j] += xr[0] * value(w0[j]) + xr[1] * value(w1[j]) + xr[2] * value(w2[j]) + xr[3] * value(w3[j]);
    }
  }
}

// y[r, :] += sum over i in [i0, i1) of x[r, i] * w[i, :]   (w: in rows of `out` values, row stride ldw)
template <typename W>
void accumulate_input_rows(const float* x, int64_t ldx, int64_t rows, const W* w, int64_t ldw, int64_t out,
                           int64_t i0, int64_t i1, float* y) {
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {  // four weight rows per pass over y: a quarter of the y traffic
    int64_t r = 0;
    if (rows >= kTiledRows) {
      for (; r + 2 <= rows; r += 2) accumulate_four_rows<2>(x + r * ldx, ldx, w, ldw, out, i, y + r * out);
    }
    for (; r < rows; ++r) accumulate_four_rows<1>(x + r * ldx, ldx, w, ldw, out, i, y + r * out);
  }
  for (; i < i1; ++i) {
    const W* wi = w + i * ldw;
    for (int64_t r = 0; r < rows; ++r) {
      float xi = x[r * ldx + i];
      float* yr = y + r * out;
      for (int64_t j = 0; j < out; ++j) yr[j] += xi * value(wi[j]);
    }
  }
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[r, o * apart] = dot(x[r, :], w[o * apart, :]) for R rows and O outputs `apart` weight rows from
// each other, one sum of 8 lanes each (R * O independent sums): each vector of x and of w is loaded
// once for all the products it enters, where a row and an output at a time load both for each FMA.
// Unless `ahead` is null, the O rows at `ahead` (same distance apart) are fetched into cache meanwhile.
template <int R, int O, typename W>
void dot_tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t apart, int64_t in, float* y,
              int64_t out, const W* ahead) {
  int64_t vector_end = in - in % 8;
  __m256 acc[R][O];
  for (int r = 0; r < R; ++r) {
    for (int o = 0; o < O; ++o) acc[r][o] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < vector_end; k += 8) {
    __m256 ws[O];
    for (int o = 0; o < O; ++o) ws[o] = load8(w + o * apart * ldw + k);
    if (ahead != nullptr && k % (64 / sizeof(W)) == 0) {  // once per 64-byte cache line
      for (int o = 0; o < O; ++o) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + o * apart * ldw + k), _MM_HINT_T0);
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256 xr = _mm256_loadu_ps(x + r * ldx + k);
      for (int o = 0; o < O; ++o) acc[r][o] = _mm256_fmadd_ps(xr, ws[o], acc[r][o]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int o = 0; o < O; ++o) {
      float sum = horizontal_sum(acc[r][o]);
      for (int64_t k = vector_end; k < in; ++k) sum += x[r * ldx + k] * value(w[o * apart * ldw + k]);
      y[r * out + o * apart] = sum;
    }
  }
}

// dot_tile over every row of x: tiles of 4 rows, then one tile of the rest. The tile from row 4 (or
// the only one) fetches the next weight rows, w + ldw (each part's rows follow each other; past the
// last, a prefetch is harmless: it never faults).
template <int O, typename W>
void dot_tiles(const float* x, int64_t ldx, int64_t rows, const W* w, int64_t ldw, int64_t apart, int64_t in,
               float* y, int64_t out) {
  int64_t fetching = rows > 4 ? 4 : 0;
  const W* next = in * static_cast<int64_t>(sizeof(W)) <= kPrefetchedRowBytes ? w + ldw : nullptr;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    dot_tile<4, O>(x + r * ldx, ldx, w, ldw, apart, in, y + r * out, out, r == fetching ? next : nullptr);
  }
  const W* ahead = r == fetching ? next : nullptr;
  switch (rows - r) {
    case 1: dot_tile<1, O>(x + r * ldx, ldx, w, ldw, apart, in, y + r * out, out, ahead); break;
    case 2: dot_tile<2, O>(x + r * ldx, ldx, w, ldw, apart, in, y + r * out, out, ahead); break;
    case 3: dot_tile<3, O>(x + r * ldx, ldx, w, ldw, apart, in, y + r * out, out, ahead); break;
  }
}

// y[r, o * apart] = dot(x[r, :], w[o * apart, :]) for O outputs `apart` weight rows from each other,
// each as four interleaved 8-lane sums (each output's sum is the same, bit for bit, whatever O).
template <int O, typename W>
__attribute__((always_inline)) inline void four_way_dots(const float* x, int64_t ldx, int64_t rows, const W* w,
                                                         int64_t ldw, int64_t apart, int64_t in, float* y,
                                                         int64_t out) {
  int64_t vector_end = in - in % 32;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    __m256 acc[O][4];
    for (int o = 0; o < O; ++o) {
      for (int m = 0; m < 4; ++m) acc[o][m] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < vector_end; k += 32) {
      __m256 xs[4];
      for (int m = 0; m < 4; ++m) xs[m] = _mm256_loadu_ps(xr + k + 8 * m);
      for (int o = 0; o < O; ++o) {
        const W* wo = w + o * apart * ldw + k;
        for (int m = 0; m < 4; ++m) acc[o][m] = _mm256_fmadd_ps(xs[m], load8(wo + 8 * m), acc[o][m]);
      }
    }
    for (int o = 0; o < O; ++o) {
      const W* wo = w + o * apart * ldw;
      __m256 total = _mm256_add_ps(_mm256_add_ps(acc[o][0], acc[o][1]), _mm256_add_ps(acc[o][2], acc[o][3]));
      float sum = horizontal_sum(total);
      for (int64_t k = vector_end; k < in; ++k) sum += xr[k] * value(wo[k]);
      y[r * out + o * apart] = sum;
    }
  }
}

// y[r, o] = dot(x[r, :], w[o, :]) for o in [o0, o1)   (w: out rows of `in` values, row stride ldw)
template <typename W>
void dot_output_rows(const float* x, int64_t ldx, int64_t rows, const W* w, int64_t ldw, int64_t in,
                     int64_t o0, int64_t o1, float* y, int64_t out) {
  int64_t part = (o1 - o0) / kStreams, rest = o0 + kStreams * part;
  if (rows >= kTiledRows) {
    for (int64_t o = o0; o < o0 + part; ++o) dot_tiles<kStreams>(x, ldx, rows, w + o * ldw, ldw, part, in, y + o, out);
    for (int64_t o = rest; o < o1; ++o) dot_tiles<1>(x, ldx, rows, w + o * ldw, ldw, 0, in, y + o, out);
    return;
  }
  // Fewer rows: four sums over each weight row per row of x.
  for (int64_t o = o0; o < o0 + part; ++o) {
    four_way_dots<kStreams>(x, ldx, rows, w + o * ldw, ldw, part, in, y + o, out);
  }
  for (int64_t o = rest; o < o1; ++o) four_way_dots<1>(x, ldx, rows, w + o * ldw, ldw, 0, in, y + o, out);
}

template <typename W>
void multiply(const float* xp, int64_t ldx, int64_t rows, const W* wp, const at::Tensor& weight, float* yp) {
  int64_t in = weight.size(1), out = weight.size(0);
  int threads = std::max(1, std::min(at::get_num_threads(), 16));
  if (weight.stride(1) == 1) {  // stored (out, in): each thread computes a block of outputs
    int64_t ldw = weight.stride(0), block = (out + threads - 1) / threads;
#pragma omp parallel num_threads(threads)
    {
      int64_t o0 = omp_get_thread_num() * block;
      if (o0 < out) dot_output_rows(xp, ldx, rows, wp, ldw, in, o0, std::min(out, o0 + block), yp, out);
    }
    return;
  }
  // Stored (in, out): each thread adds up a block of input rows into its own copy of y (the first
  // thread into y itself), then each adds a block of columns of the copies into y.
  int64_t ldw = weight.stride(1), block = ((in + threads - 1) / threads + 3) / 4 * 4;
  int blocks = static_cast<int>((in + block - 1) / block);
  // Kept from call to call: a step runs dozens of products, each needing this much.
  static thread_local std::vector<float> partial;
  partial.resize(std::max(blocks - 1, 1) * rows * out);
  float* pp = partial.data();
#pragma omp parallel num_threads(blocks)
  {
    int b = omp_get_thread_num();
    float* own = b == 0 ? yp : pp + (b - 1) * rows * out;
    std::fill(own, own + rows * out, 0.0f);
    accumulate_input_rows(xp, ldx, rows, wp, ldw, out, b * block, std::min(in, (b + 1) * block), own);
#pragma omp barrier
    int64_t total = rows * out, columns = (total + blocks - 1) / blocks;
    int64_t c0 = b * columns, c1 = std::min(total, c0 + columns);
    for (int other = 1; other < blocks; ++other) {
      const float* part = pp + (other - 1) * total;
      for (int64_t c = c0; c < c1; ++c) yp[c] += part[c];
    }
  }
}

// y (rows, out) = x (rows, in; row stride ldx) @ weight.T, for a float32 or bfloat16 weight (out, in)
// whose rows or columns are contiguous.
inline void product(const float* x, int64_t ldx, int64_t rows, const at::Tensor& weight, float* y) {
  if (weight.scalar_type() == at::kFloat) {
    multiply(x, ldx, rows, weight.data_ptr<float>(), weight, y);
  } else {
    multiply(x, ldx, rows, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), weight, y);
  }
}

}  // namespace uio_cpu
