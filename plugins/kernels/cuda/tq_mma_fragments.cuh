// Dequantizing packed 2- and 4-bit codes straight into mma.sync operand registers.
//
// The fast decode attention (tq_paged_attention_mma.cu) never writes a dequantized tile to shared
// memory: each lane reads exactly the packed bytes whose centroids it holds in its m16n8k16
// fragments and turns them into fp16 pairs: 4-bit codes through a shared-memory pair table,
// 2-bit codes with byte permutes (prmt) over a codebook held in registers. A dot product does not care in which order it visits its terms, so the kernel
// picks the order of the head dimension that makes each lane's bytes contiguous, and permutes the
// query (and un-permutes the output) to match.
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
namespace mma {

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}

__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
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

__device__ __forceinline__ float fast_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// Byte `which` (0 = low, 1 = high) of the fp16 centroids first..first+3, packed into one word.
__device__ __forceinline__ uint32_t centroid_bytes(const float* codebook, int first, int which) {
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t bits = __half_as_ushort(__float2half_rn(__ldg(codebook + first + i)));
    word |= ((bits >> (8 * which)) & 0xFFu) << (8 * i);
  }
  return word;
}

template <int BITS>
struct Codebook;

// 4 fp16 centroids: lo/hi = low/high bytes of codes 0..3.
template <>
struct Codebook<2> {
  uint32_t lo, hi;
  __device__ __forceinline__ void load(const float* codebook) {
    lo = centroid_bytes(codebook, 0, 0);
    hi = centroid_bytes(codebook, 0, 1);
  }
  // Sixteen 2-bit codes (crumb i = code i) -> eight fp16 pairs:
  //   even[j] = (c[crumb 4j], c[crumb 4j+2]),  odd[j] = (c[crumb 4j+1], c[crumb 4j+3]).
  __device__ __forceinline__ void pairs(uint32_t u, uint32_t (&even)[4], uint32_t (&odd)[4]) const {
    const uint32_t e = u & 0x33333333u, o = (u >> 2) & 0x33333333u;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const uint32_t se = half ? e >> 16 : e, so = half ? o >> 16 : o;
      uint32_t l = prmt(lo, 0u, se), h = prmt(hi, 0u, se);
      even[2 * half] = prmt(l, h, 0x5140u);
      even[2 * half + 1] = prmt(l, h, 0x7362u);
      l = prmt(lo, 0u, so);
      h = prmt(hi, 0u, so);
      odd[2 * half] = prmt(l, h, 0x5140u);
      odd[2 * half + 1] = prmt(l, h, 0x7362u);
    }
  }
};

// 4-bit codes through shared memory: for every byte b, the fp16 pair (c[b & 15], c[b >> 4]) (low
// nibble = even coordinate), one copy of the 256 entries per lane (word 32 b + lane), so the 32 lanes'
// lookups always fall in 32 different banks. One lookup dequantizes two codes: a byte extract (ALU),
// an address (FMA pipe) and a shared load, instead of ~5 ALU byte permutes per pair.
constexpr int kPairTableWords = 256 * 32;

struct PairTable {
  uint32_t lane_base;  // shared-window address of this lane's entry 0
  __device__ __forceinline__ uint32_t operator()(uint32_t byte) const {
    // not volatile: the table is constant once filled, so the compiler may schedule these freely
    uint32_t v;
    asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(byte * 128u + lane_base));
    return v;
  }
};

// Cooperative fill by the whole CTA (the caller synchronizes before use).
__device__ __forceinline__ void fill_pair_table(uint32_t* table, const float* codebook) {
  for (int w = threadIdx.x; w < kPairTableWords; w += blockDim.x) {
    const int b = w >> 5;
    table[w] = half2_bits(__ldg(codebook + (b & 15)), __ldg(codebook + (b >> 4)));
  }
}

// Byte k (0..3) of w, zero-extended.
__device__ __forceinline__ uint32_t byte_of(uint32_t w, int k) { return prmt(w, 0u, 0x4440u | static_cast<uint32_t>(k)); }

// Two tokens' packed words x, y -> one word whose byte k holds x's then y's low (even) or high
// (odd) nibble of byte k: dequantizing it pairs the two tokens at one coordinate.
__device__ __forceinline__ uint32_t interleave_even(uint32_t x, uint32_t y) {
  return (x & 0x0F0F0F0Fu) | ((y << 4) & 0xF0F0F0F0u);
}
__device__ __forceinline__ uint32_t interleave_odd(uint32_t x, uint32_t y) {
  return ((x >> 4) & 0x0F0F0F0Fu) | (y & 0xF0F0F0F0u);
}

}  // namespace mma
}  // namespace tq_cuda
