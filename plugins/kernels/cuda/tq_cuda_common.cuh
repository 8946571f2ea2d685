// Device helpers shared by the TurboQuant CUDA kernels: dtype loads/stores, bit packing, block
// reductions and the one-vector encoder used by both TQEncode and TQCacheUpdate.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "tq_cuda.h"

namespace tq_cuda {

constexpr int kThreads = 128;  // every kernel runs 4 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCodebook = 16;  // 2**4

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Code i of a little-endian bit stream of `bits`-bit codes (a 3-bit code may straddle two bytes).
__device__ __forceinline__ int unpack_code(const uint8_t* packed, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  unsigned v = packed[byte];
  if (shift + bits > 8) v |= static_cast<unsigned>(packed[byte + 1]) << 8;
  return static_cast<int>((v >> shift) & ((1u << bits) - 1u));
}

// Byte p of the packed stream of `dim` codes held one per byte in `codes`.
__device__ __forceinline__ uint8_t pack_byte(const uint8_t* codes, int64_t dim, int bits, int64_t p) {
  unsigned byte = 0;
  for (int b = 0; b < 8; ++b) {
    const int64_t bit = p * 8 + b;
    const int64_t i = bit / bits;
    if (i >= dim) break;
    byte |= ((static_cast<unsigned>(codes[i]) >> (bit % bits)) & 1u) << b;
  }
  return static_cast<uint8_t>(byte);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the CTA; every thread gets the result. `scratch` holds kWarps floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Decision boundaries b_k = (c_{k+1} + c_k) / 2 into shared memory (2**bits - 1 of them).
__device__ __forceinline__ void load_boundaries(const float* codebook, int bits, float* bounds) {
  const int nb = (1 << bits) - 1;
  for (int k = threadIdx.x; k < nb; k += blockDim.x) bounds[k] = (codebook[k + 1] + codebook[k]) * 0.5f;
}

// Encodes one vector x[dim] with the whole CTA. Shared scratch: xs[dim] floats, codes[dim] bytes,
// red[kWarps] floats; bounds[2**bits - 1] must be loaded (and synchronized) by the caller.
template <typename T>
__device__ void encode_vector(const T* __restrict__ x, int64_t dim, const float* __restrict__ rotation,
                              const float* bounds, int bits, float* xs, uint8_t* codes, float* red,
                              uint8_t* __restrict__ out_codes, float* __restrict__ out_norm) {
  float sq = 0.f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const float v = to_float(x[j]);
    xs[j] = v;
    sq += v * v;
  }
  const float norm = sqrtf(block_sum(sq, red));  // block_sum synchronizes: xs is complete
  const int nb = (1 << bits) - 1;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const float* row = rotation + j * dim;
    float dot = 0.f;
    for (int64_t i = 0; i < dim; ++i) dot = fmaf(row[i], xs[i], dot);
    const float y = norm > 0.f ? dot / norm : 0.f;
    int code = 0;
    for (int k = 0; k < nb; ++k) code += bounds[k] < y;  // on a boundary: the lower code
    codes[j] = static_cast<uint8_t>(code);
  }
  __syncthreads();
  const int64_t packed = (dim * bits + 7) / 8;
  for (int64_t p = threadIdx.x; p < packed; p += blockDim.x) out_codes[p] = pack_byte(codes, dim, bits, p);
  if (threadIdx.x == 0) *out_norm = norm;
  __syncthreads();  // the caller may reuse xs/codes for the next vector
}

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

inline bool valid_bits(int bits) { return bits >= 1 && bits <= 4; }

// Opts a kernel into more than 48 KiB of dynamic shared memory when it needs it.
template <typename Kernel>
inline int reserve_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  return static_cast<int>(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace tq_cuda
