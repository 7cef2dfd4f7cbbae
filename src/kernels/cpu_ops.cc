// Fused elementwise kernels for MindSpore's CPU backend (ops.Custom, func_type "aot"), built
// by src/kernels/__init__.py on first use. Each computes, in one pass over the tensor and on
// several threads, exactly the float32 operations of a chain of MindSpore operations, in the
// same order, so that the results are bit-identical to that chain:
//
//   FakeQuant: (clamp(round(x / s) [+ z], lo, hi) [- z]) * s      (quantizer.fake_quant / _asym)
//              round: half to even (nearbyint); clamp as MindSpore's Maximum then Minimum
//              compute it, max(a, b) = a > b ? a : b (a NaN becomes lo, max(-0, 0) is +0);
//              z only for the asymmetric grid.
//   Gelu:      (x * (erf(x / sqrt2) + 1)) * 0.5                   (src.models.vit.GELU)
//
// Built with -ffp-contract=off (no fused multiply-add) and without -ffast-math. Denormal inputs
// and results are flushed to zero (x86 MXCSR DAZ and FTZ) while a kernel runs, as MindSpore's
// own CPU kernels run.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#define VTPTQ_X86 1
#endif

namespace {

int64_t NumElements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

class FlushDenormals {  // DAZ | FTZ for the lifetime of the object, on this thread
 public:
  FlushDenormals() {
#ifdef VTPTQ_X86
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);
#endif
  }
  ~FlushDenormals() {
#ifdef VTPTQ_X86
    _mm_setcsr(saved_);
#endif
  }

 private:
  unsigned int saved_ = 0;
};

// Runs f(begin, end) over [0, n) on up to `threads` threads (the caller's thread included).
template <class F>
void Parallel(int64_t n, int threads, const F &f) {
  const int64_t min_chunk = 1 << 15;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / min_chunk)));
  auto run = [&f](int64_t a, int64_t b) {
    FlushDenormals guard;
    f(a, b);
  };
  if (threads <= 1) {
    run(0, n);
    return;
  }
  const int64_t step = ((n + threads - 1) / threads + 15) / 16 * 16;
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    const int64_t a = t * step, b = std::min(n, a + step);
    if (a < b) pool.emplace_back(run, a, b);
  }
  run(0, std::min(n, step));
  for (auto &th : pool) th.join();
}

}  // namespace

// inputs: x (float32, any shape), scale (float32, 1 element), zero point (float32, 1 element),
// config (float32: lo, hi, use_zero_point, threads); output: float32, the shape of x.
extern "C" int FakeQuant(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  if (nparam != 5) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float s = *static_cast<const float *>(params[1]);
  const float z = *static_cast<const float *>(params[2]);
  const float *cfg = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const float lo = cfg[0], hi = cfg[1];
  const bool use_z = cfg[2] != 0.0f;
  const int threads = static_cast<int>(cfg[3]);
  const int64_t n = NumElements(ndims[0], shapes[0]);
  Parallel(n, threads, [=](int64_t a, int64_t b) {
    if (use_z) {
      for (int64_t i = a; i < b; ++i) {
        float r = std::nearbyint(x[i] / s) + z;
        r = r > lo ? r : lo;
        r = r < hi ? r : hi;
        y[i] = (r - z) * s;
      }
    } else {
      for (int64_t i = a; i < b; ++i) {
        float r = std::nearbyint(x[i] / s);
        r = r > lo ? r : lo;
        r = r < hi ? r : hi;
        y[i] = r * s;
      }
    }
  });
  return 0;
}

// inputs: x (float32), config (float32: sqrt2, threads); output: float32, the shape of x.
extern "C" int Gelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                    void *extra) {
  if (nparam != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *cfg = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const float sqrt2 = cfg[0];
  const int threads = static_cast<int>(cfg[1]);
  const int64_t n = NumElements(ndims[0], shapes[0]);
  Parallel(n, threads, [=](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const float v = x[i];
      y[i] = (v * (std::erf(v / sqrt2) + 1.0f)) * 0.5f;
    }
  });
  return 0;
}

// (A, B, C, D) -> (A, C, B, D) (the attention heads' transposition); pure data movement.
// inputs: x (float32, 4-D), config (float32: threads); output: float32 (A, C, B, D).
extern "C" int Permute0213(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 3 || ndims[0] != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int threads = static_cast<int>(static_cast<const float *>(params[1])[0]);
  float *y = static_cast<float *>(params[2]);
  const int64_t a = shapes[0][0], b = shapes[0][1], c = shapes[0][2], d = shapes[0][3];
  // one row of d floats per (i, k, j) of the output, rows in output order
  Parallel(a * c * b * d, threads, [=](int64_t lo, int64_t hi) {
    for (int64_t row = lo / d; row * d < hi; ++row) {
      const int64_t j = row % b, k = (row / b) % c, i = row / (b * c);
      const float *src = x + ((i * b + j) * c + k) * d;
      float *dst = y + row * d;
      const int64_t start = std::max<int64_t>(lo - row * d, 0), stop = std::min<int64_t>(hi - row * d, d);
      for (int64_t e = start; e < stop; ++e) dst[e] = src[e];
    }
  });
  return 0;
}

// (A, B, 3, C, D) -> three (A, C, B, D): the attention's Q, K and V from the qkv projection
// (B tokens, C heads of D channels), split and transposed in one pass; pure data movement.
// inputs: x (float32, 5-D), config (float32: threads); outputs: q, k, v (float32, 4-D).
extern "C" int SplitHeads(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 5 || ndims[0] != 5 || shapes[0][2] != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int threads = static_cast<int>(static_cast<const float *>(params[1])[0]);
  float *out[3] = {static_cast<float *>(params[2]), static_cast<float *>(params[3]),
                   static_cast<float *>(params[4])};
  const int64_t a = shapes[0][0], b = shapes[0][1], c = shapes[0][3], d = shapes[0][4];
  const int64_t rows = a * c * b;  // rows of d floats in each output, in output order
  Parallel(3 * rows * d, threads, [=](int64_t lo, int64_t hi) {
    for (int64_t row = lo / d; row * d < hi; ++row) {
      const int64_t part = row / rows, r = row % rows;
      const int64_t j = r % b, k = (r / b) % c, i = r / (b * c);
      const float *src = x + (((i * b + j) * 3 + part) * c + k) * d;
      float *dst = out[part] + r * d;
      const int64_t start = std::max<int64_t>(lo - row * d, 0), stop = std::min<int64_t>(hi - row * d, d);
      for (int64_t e = start; e < stop; ++e) dst[e] = src[e];
    }
  });
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Kernels for numpy arrays (called through ctypes by the interval search, on the caller's
// thread; no denormal flushing, as numpy computes). Each reproduces a numpy computation of
// src/quant bit for bit: the same float32 operations, and float64 sums in numpy's order.

typedef float V8f __attribute__((vector_size(32)));
typedef double V8d __attribute__((vector_size(64)));

inline V8f Load8(const float *p) {
  V8f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline V8f Abs8(V8f x) {  // |x| lane by lane (clears the sign bit, as fabs)
  typedef int32_t V8i __attribute__((vector_size(32)));
  const V8i mask = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
  return reinterpret_cast<V8f>(reinterpret_cast<V8i>(x) & mask);
}

// The all-pairs hinge sums of vtptq's ranking loss (src/quant/vtptq.py ranking_loss_all_pairs):
// for every column (candidate ci, row r), with the row's quantized scores taken in the order of
// decreasing FP score (`order`) and the FP scores so sorted (`a_sorted`),
//   acc[ci, r] = Σ_{k=1}^{T-1} ( Σ_{p=0}^{T-k-1} h(p, k) )     (float64, each sum in this order)
//   h = x + |x|,  x = θ - d,  d = q[p] - q[p + k]  (float32; d · 0 where a[p] == a[p + k], a tie)
// which is what numpy's sums over the pair-difference slices give (its axis-0 sums run over the
// slice's rows in order). q: (c, rows, T) float32; order: (rows, T) int64; a_sorted: (rows, T)
// float32; acc: (c, rows) float64. Columns are taken 16 at a time (one vector lane each).
extern "C" int RankHingeAllPairs(const float *q, const int64_t *order, const float *a_sorted, int64_t c,
                                 int64_t rows, int64_t t, float theta, double *acc) {
  constexpr int W = 32;
  if (t < 1 || rows < 0 || c < 0) return 1;
  std::vector<float> qt(t * W), at(t * W);
  double out[W];
  const V8f theta8 = {theta, theta, theta, theta, theta, theta, theta, theta};
  const V8f one = {1, 1, 1, 1, 1, 1, 1, 1}, zero = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t r0 = 0; r0 < rows; r0 += W) {
    const int64_t wn = std::min<int64_t>(W, rows - r0);
    bool tied = false;
    for (int w = 0; w < W; ++w) {  // lanes past the last row repeat it (their sums are dropped)
      const int64_t r = r0 + std::min<int64_t>(w, wn - 1);
      const float *ar = a_sorted + r * t;
      for (int64_t p = 0; p < t; ++p) at[p * W + w] = ar[p];
      for (int64_t p = 1; p < t; ++p) tied = tied || ar[p] == ar[p - 1];
    }
    for (int64_t ci = 0; ci < c; ++ci) {
      for (int w = 0; w < W; ++w) {
        const int64_t r = r0 + std::min<int64_t>(w, wn - 1);
        const float *qr = q + (ci * rows + r) * t;
        const int64_t *o = order + r * t;
        for (int64_t p = 0; p < t; ++p) qt[p * W + w] = qr[o[p]];
      }
      // W / 8 vectors of 8 lanes side by side (independent chains of additions), sums in registers
      V8d total[W / 8] = {};
      for (int64_t k = 1; k < t; ++k) {
        V8d s[W / 8] = {};
        for (int64_t p = 0; p + k < t; ++p) {
          for (int v = 0; v < W / 8; ++v) {
            V8f d = Load8(&qt[p * W + 8 * v]) - Load8(&qt[(p + k) * W + 8 * v]);
            if (tied) d = d * (Load8(&at[p * W + 8 * v]) != Load8(&at[(p + k) * W + 8 * v]) ? one : zero);
            d = theta8 - d;
            d = d + Abs8(d);
            s[v] += __builtin_convertvector(d, V8d);
          }
        }
        for (int v = 0; v < W / 8; ++v) total[v] += s[v];
      }
      for (int v = 0; v < W / 8; ++v)
        for (int w = 0; w < 8; ++w) out[8 * v + w] = total[v][w];
      for (int64_t w = 0; w < wn; ++w) acc[ci * rows + r0 + w] = out[w];
    }
  }
  return 0;
}

// The hinges of vtptq's ranking loss over sampled column pairs (src/quant/vtptq.py
// _ranking_loss_pairs): d[ci, e] = max(θ - (q[ci, hi[e]] - q[ci, lo[e]]), 0) in float32, as
// numpy's two gathers, two subtractions and maximum give it (a NaN stays NaN), in one pass.
// q: (c, width) float32; hi, lo: (m,) int64 flat indices into a row of q; d: (c, m) float32.
extern "C" int RankHingePairs(const float *q, int64_t c, int64_t width, const int64_t *hi, const int64_t *lo,
                              int64_t m, float theta, float *d) {
  if (c < 0 || m < 0) return 1;
  for (int64_t e = 0; e < m; ++e)
    if (hi[e] < 0 || hi[e] >= width || lo[e] < 0 || lo[e] >= width) return 2;
  for (int64_t ci = 0; ci < c; ++ci) {
    const float *qc = q + ci * width;
    float *dc = d + ci * m;
    for (int64_t e = 0; e < m; ++e) {
      float v = qc[hi[e]] - qc[lo[e]];
      v = theta - v;
      dc[e] = v < 0.0f ? 0.0f : v;
    }
  }
  return 0;
}

// The uniform fake quantizer of the interval search (src/quant/quantizer.py fake_quant_np):
//   y[ci, i] = min(max(rint(x[i] / s), lo), hi) * s,   s = scale[ci * period + (i / inner) % period]
// in float32, as numpy's divide, rint (half to even), clip and multiply compute it (a NaN stays
// NaN, -0 stays -0). x: (n,) float32; scale: (c, period) float32; out: (c, n) float32, or the
// same values converted to float64 (numpy's astype) where to_double is set. `period`
// and `inner` give the scale's broadcast over x: 1 and any for one scale per candidate; the
// number of channels and the elements per channel for a per-channel scale.
inline float FakeQuantOne(float x, float s, float lo, float hi) {
  float v = std::nearbyint(x / s);
  if (!std::isnan(v)) {
    v = v > lo ? v : lo;
    v = v < hi ? v : hi;
  }
  return v * s;
}

#ifdef __AVX__
// 8 lanes of FakeQuantOne: the same division and rounding (to nearest even, no exceptions);
// max/min return their second operand for a NaN, so a NaN lane is put back after the clip
inline __m256 FakeQuant8(__m256 x, __m256 s, __m256 lo, __m256 hi) {
  const __m256 v = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 clipped = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
  return _mm256_mul_ps(_mm256_blendv_ps(clipped, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)), s);
}
#endif

extern "C" int FakeQuantCandidates(const float *x, int64_t n, const float *scale, int64_t c, int64_t period,
                                   int64_t inner, float lo, float hi, void *out, int to_double) {
  if (n < 0 || c < 0 || period < 1 || inner < 1) return 1;
#ifndef __AVX__
  return 3;  // one element at a time it is slower than numpy's passes: the caller uses numpy
#else
  const __m256 lo8 = _mm256_set1_ps(lo), hi8 = _mm256_set1_ps(hi);
  float *y = static_cast<float *>(out);
  double *y64 = static_cast<double *>(out);
  // stores 8 results at element i of row ci, as float32 or converted to float64 (exact)
  auto store8 = [&](int64_t k, __m256 v) {
    if (to_double) {
      _mm256_storeu_pd(y64 + k, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
      _mm256_storeu_pd(y64 + k + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    } else {
      _mm256_storeu_ps(y + k, v);
    }
  };
  auto store1 = [&](int64_t k, float v) {
    if (to_double) y64[k] = v; else y[k] = v;
  };
  for (int64_t ci = 0; ci < c; ++ci) {
    const float *sc = scale + ci * period;
    const int64_t yc = ci * n;
    if (inner == 1 && period > 1) {  // a scale per element of each run of `period` (e.g. per column)
      for (int64_t i0 = 0; i0 < n; i0 += period) {
        const int64_t len = std::min(period, n - i0);
        int64_t j = 0;
        for (; j + 8 <= len; j += 8)
          store8(yc + i0 + j, FakeQuant8(_mm256_loadu_ps(x + i0 + j), _mm256_loadu_ps(sc + j), lo8, hi8));
        for (; j < len; ++j) store1(yc + i0 + j, FakeQuantOne(x[i0 + j], sc[j], lo, hi));
      }
      continue;
    }
    for (int64_t b = 0, i = 0; i < n; ++b) {  // runs of `inner` elements share one scale
      const float s = sc[b % period];
      const int64_t end = std::min(n, i + inner);
      const __m256 s8 = _mm256_set1_ps(s);
      for (; i + 8 <= end; i += 8) store8(yc + i, FakeQuant8(_mm256_loadu_ps(x + i), s8, lo8, hi8));
      for (; i < end; ++i) store1(yc + i, FakeQuantOne(x[i], s, lo, hi));
    }
  }
  return 0;
#endif
}

// FakeQuantCandidates for one scale per candidate, with the results' sums over the rows of each
// block: x: (blocks, rows, width) float32; scale: (c,) float32; y: (c, blocks, rows, width) float32;
// sums: (c, blocks, width) float64 with sums[ci, b, w] = ((0 + y[ci, b, 0, w]) + y[ci, b, 1, w]) + ...
// (each term converted to float64, added in row order), which is what
// numpy's y.sum(axis=-2, dtype=np.float64) gives for these shapes (its reduction runs over the
// rows with the width as the inner loop; tests/test_kernels.py).
extern "C" int FakeQuantRowSums(const float *x, int64_t blocks, int64_t rows, int64_t width, const float *scale,
                                int64_t c, float lo, float hi, float *y, double *sums) {
  if (blocks < 0 || rows < 1 || width < 1 || c < 0) return 1;
#ifndef __AVX__
  return 3;  // the caller uses numpy
#else
  const __m256 lo8 = _mm256_set1_ps(lo), hi8 = _mm256_set1_ps(hi);
  const int64_t block = rows * width;
  for (int64_t ci = 0; ci < c; ++ci) {
    const float s = scale[ci];
    const __m256 s8 = _mm256_set1_ps(s);
    for (int64_t b = 0; b < blocks; ++b) {
      const float *xb = x + b * block;
      float *yb = y + (ci * blocks + b) * block;
      double *acc = sums + (ci * blocks + b) * width;
      std::fill(acc, acc + width, 0.0);  // numpy starts from +0 (a column of -0 sums to +0)
      for (int64_t r = 0; r < rows; ++r) {
        const float *xr = xb + r * width;
        float *yr = yb + r * width;
        int64_t w = 0;
        for (; w + 8 <= width; w += 8) {
          const __m256 v = FakeQuant8(_mm256_loadu_ps(xr + w), s8, lo8, hi8);
          _mm256_storeu_ps(yr + w, v);
          const __m256d v0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
          const __m256d v1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
          _mm256_storeu_pd(acc + w, _mm256_add_pd(_mm256_loadu_pd(acc + w), v0));
          _mm256_storeu_pd(acc + w + 4, _mm256_add_pd(_mm256_loadu_pd(acc + w + 4), v1));
        }
        for (; w < width; ++w) {
          const float v = FakeQuantOne(xr[w], s, lo, hi);
          yr[w] = v;
          acc[w] += static_cast<double>(v);
        }
      }
    }
  }
  return 0;
#endif
}
