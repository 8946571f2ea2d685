// Internal helpers of the CPU kernels: float loops written so that the compiler vectorizes
// them without -ffast-math, and per-function multiversioning for AVX2/FMA machines.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "tq_half.h"
#include "tq_kernels.h"

#if defined(__GNUC__)
#define TQ_INLINE inline __attribute__((always_inline))
#else
#define TQ_INLINE inline
#endif

// Hot functions get an x86-64-v3 (AVX2 + FMA) clone next to the portable one; the dynamic
// loader picks the clone the CPU supports (GCC ifunc), so one binary runs everywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(TQ_NO_MULTIVERSION)
#define TQ_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TQ_MULTIVERSION
#endif

namespace tq {
namespace detail {

// Eight float lanes: GCC/Clang vector extensions (one AVX register in the x86-64-v3 clone, two
// SSE registers in the portable one); a plain struct elsewhere.
#if defined(__GNUC__)
typedef float F8 __attribute__((vector_size(32)));
TQ_INLINE F8 f8_set1(float x) { return F8{x, x, x, x, x, x, x, x}; }
#else
struct F8 {
  float v[8];
  float& operator[](int i) { return v[i]; }
  float operator[](int i) const { return v[i]; }
  F8& operator+=(const F8& o) { for (int i = 0; i < 8; ++i) v[i] += o.v[i]; return *this; }
  F8& operator*=(const F8& o) { for (int i = 0; i < 8; ++i) v[i] *= o.v[i]; return *this; }
  friend F8 operator*(const F8& a, const F8& b) { F8 r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
  friend F8 operator+(const F8& a, const F8& b) { F8 r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
  friend F8 operator*(const F8& a, float b) { F8 r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b; return r; }
};
TQ_INLINE F8 f8_set1(float x) { F8 r; for (int i = 0; i < 8; ++i) r.v[i] = x; return r; }
#endif
TQ_INLINE F8 f8_zero() { return f8_set1(0.f); }
TQ_INLINE F8 f8_load(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
TQ_INLINE void f8_store(float* p, const F8& v) { std::memcpy(p, &v, sizeof v); }
TQ_INLINE float f8_sum(const F8& a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

// out[i * out_stride_a + j * out_stride_b] = <a_i, b_j> for NA rows of a and NB rows of b, each
// n floats long (n % 8 == 0). The NA x NB vector accumulators stay in registers; every loaded
// vector of a is used NB times and every vector of b NA times (a small GEMM micro-kernel).
template <int NA, int NB>
TQ_INLINE void dot_block(const float* a, int64_t a_stride, const float* b, int64_t b_stride, int64_t n, float* out,
                         int64_t out_stride_a, int64_t out_stride_b) {
  F8 acc[NA][NB];
  for (int i = 0; i < NA; ++i) {
    for (int j = 0; j < NB; ++j) acc[i][j] = f8_zero();
  }
  for (int64_t k = 0; k < n; k += 8) {
    F8 bv[NB];
    for (int j = 0; j < NB; ++j) bv[j] = f8_load(b + j * b_stride + k);
    for (int i = 0; i < NA; ++i) {
      const F8 av = f8_load(a + i * a_stride + k);
      for (int j = 0; j < NB; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < NA; ++i) {
    for (int j = 0; j < NB; ++j) out[i * out_stride_a + j * out_stride_b] = f8_sum(acc[i][j]);
  }
}

// Eight independent partial sums: a plain `s += a[i] * b[i]` loop must stay sequential
// under IEEE rules, this one maps onto vector registers.
TQ_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

TQ_INLINE void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// y = M x for a row-major square M [n, n].
TQ_INLINE void matvec(const float* m, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = dot(m + i * n, x, n);
}

// y = M^T x (= x @ M) for a row-major square M [n, n].
TQ_INLINE void matvec_transposed(const float* m, const float* x, float* y, int64_t n) {
  std::fill(y, y + n, 0.f);
  for (int64_t i = 0; i < n; ++i) axpy(x[i], m + i * n, y, n);
}

// Hint the cache lines of [p, p + bytes) into the caches ahead of use.
TQ_INLINE void prefetch(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
  __builtin_prefetch(c + bytes - 1, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

TQ_INLINE void load_as_float(const void* src, DType type, int64_t offset, int64_t n, float* dst) {
  if (type == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(src) + offset, static_cast<size_t>(n) * sizeof(float));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(h[i]);
  }
}

TQ_INLINE void store_from_float(const float* src, int64_t n, void* dst, DType type, int64_t offset) {
  if (type == DType::kFloat32) {
    std::memcpy(static_cast<float*>(dst) + offset, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    uint16_t* h = static_cast<uint16_t*>(dst) + offset;
    for (int64_t i = 0; i < n; ++i) h[i] = float_to_half(src[i]);
  }
}

}  // namespace detail
}  // namespace tq
