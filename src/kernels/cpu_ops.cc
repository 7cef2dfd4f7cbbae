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
