// Device helpers shared by the TurboQuant CUDA kernels: dtype loads/stores (cache norms included),
// warp reductions, the scaled vector norm, bit-field extraction from packed codes, and launch
// bookkeeping.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "tq_cuda.h"

namespace tq_cuda {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;
constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ inline bool valid_bits(int bits) { return bits >= kMinBits && bits <= kMaxBits; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A paged cache's norms are float32 or float16 (the call's norm_dtype, one type per launch). A
// float16 norm is the float32 one rounded to nearest even (+inf past 65504) and reads back exactly;
// every use of a norm is float32. kHalf: the kernels that take the norm type as a template
// parameter (few instances: the float32 ones compile as before).
__host__ __device__ inline bool valid_norm_dtype(int type) { return type == TQ_FLOAT32 || type == TQ_FLOAT16; }
template <bool kHalf>
__device__ __forceinline__ float load_norm(const void* norms, int64_t i) {
  if constexpr (kHalf) return __half2float(__ldg(static_cast<const __half*>(norms) + i));
  else return __ldg(static_cast<const float*>(norms) + i);
}
template <bool kHalf>
__device__ __forceinline__ void store_norm(void* norms, int64_t i, float v) {
  if constexpr (kHalf) static_cast<__half*>(norms)[i] = __float2half_rn(v);
  else static_cast<float*>(norms)[i] = v;
}

// Online softmax: the running max starts at -inf (a finite floor such as -1e30 would outrank a row
// whose scores all lie below it and give zeros). exp2 takes its exponents relative to
// softmax_base(max): the max itself, or 0 while no live score has been seen, so that -inf - -inf
// never makes a NaN and every weight of such a row is exp2(-inf) = 0.
constexpr float kNoScore = -INFINITY;
__device__ __forceinline__ float softmax_base(float running_max) {
  return running_max == -INFINITY ? 0.f : running_max;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// 2^e with e the binade exponent of `amax` (amax = m * 2^e, m in [0.5, 1)); 1 for 0, inf or NaN.
// Scaling by its reciprocal is exact, so norms of scaled vectors are the plain norms scaled.
__device__ __forceinline__ int binade(float amax) {
  int e = 0;
  if (amax > 0.f && amax <= 3.402823466e38f) frexpf(amax, &e);
  return e;
}

// Bits [first, first + count) of a little-endian bit stream held in 32-bit words (count <= 25:
// the field lies within two consecutive words).
__device__ __forceinline__ uint32_t stream_bits(const uint32_t* words, int first, int count) {
  const int w = first >> 5, s = first & 31;
  const uint32_t lo = words[w];
  const uint32_t both = s + count > 32 ? __funnelshift_r(lo, words[w + 1], s) : lo >> s;
  return both & ((1u << count) - 1u);
}

// Code i of a little-endian bit stream of `bits`-bit codes in global or shared bytes.
__device__ __forceinline__ int unpack_code(const uint8_t* packed, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  unsigned v = packed[byte];
  if (shift + bits > 8) v |= static_cast<unsigned>(packed[byte + 1]) << 8;
  return static_cast<int>((v >> shift) & ((1u << bits) - 1u));
}

// Nearest centroid: the number of the 2**bits - 1 ascending boundaries strictly below y (a
// binary search; NaN counts none).
__device__ __forceinline__ int quantize(float y, const float* bounds, int bits) {
  int code = 0;
  for (int step = 1 << (bits - 1); step > 0; step >>= 1) code += bounds[code + step - 1] < y ? step : 0;
  return code;
}

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

int num_sms();

// Opts a kernel into more than 48 KiB of dynamic shared memory when it needs it.
template <typename Kernel>
inline int reserve_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  const cudaError_t rc = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(bytes));
  if (rc != cudaSuccess) cudaGetLastError();  // reported here: leave no stale error for a later launch
  return static_cast<int>(rc);
}

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace tq_cuda
