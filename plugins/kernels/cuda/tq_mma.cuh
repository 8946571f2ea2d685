// mma.sync and friends (sm_80+): fp16 tensor-core products with fp32 accumulation, matrix
// loads from shared memory, and the small bit and math intrinsics the tensor-core kernels use.
//
// m16n8k16 fragments (PTX ISA, "mma.m16n8k16" .f16): lane = 4 * gid + tig,
//   A (16x16): a[0] = (row gid,   k 2tig..2tig+1)   a[1] = (row gid+8, k 2tig..2tig+1)
//              a[2] = (row gid,   k 2tig+8..+9)     a[3] = (row gid+8, k 2tig+8..+9)
//   B (16x8):  b[0] = (k 2tig..2tig+1, col gid)     b[1] = (k 2tig+8..+9, col gid)
//   C (16x8):  c[0..1] = (row gid, cols 2tig..+1)   c[2..3] = (row gid+8, cols 2tig..+1)
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace tq_cuda {

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}

__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float2 half2_floats(uint32_t bits) {
  return __half22float2(*reinterpret_cast<const __half2*>(&bits));
}

// D += A * B, fp16 operands, fp32 accumulate.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The 8x8 b16 matrix whose row gid, cols 2tig..2tig+1 this lane holds, transposed (same layout).
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

// Four 8x8 b16 matrices from shared memory: lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void copy_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void copy_async_8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void copy_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}
// 4 bytes into shared memory, the first `bytes` (1..4) of them from global memory, the rest zero.
__device__ __forceinline__ void copy_async_4_partial(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}
// The same without cp.async, for a word that would end past its array: memcheck holds a cp.async to
// its full 4 bytes whatever src-size says, so the `bytes` (1..3) are loaded one by one and stored.
__device__ __forceinline__ void store_partial_word(uint32_t dst, const uint8_t* src, int bytes) {
  uint32_t word = 0;
  for (int b = 0; b < bytes; ++b) word |= static_cast<uint32_t>(__ldg(src + b)) << (8 * b);
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(dst), "r"(word) : "memory");
}
template <int BYTES>
__device__ __forceinline__ void copy_async(uint32_t dst, const void* src) {
  if constexpr (BYTES == 16) copy_async_16(dst, src);
  else if constexpr (BYTES == 8) copy_async_8(dst, src);
  else copy_async_4(dst, src);
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

}  // namespace tq_cuda
