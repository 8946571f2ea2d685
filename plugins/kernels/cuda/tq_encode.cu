// TQEncode on the GPU; TQCacheUpdate (tq_cache_update.cu) runs the same kernels with its rows
// landing in cache slots (Rows, tq_encode_rows.cuh).
//
// Tensor-core path (head dim 64 or 128): persistent CTAs (EncodeSmem says how many warps: as many
// as shared memory holds, up to 12) keep Pi in shared memory as two fp16 parts (hi + lo * 2^-11,
// so that fp16 products accumulated in fp32 reproduce the fp32 rotation to ~2^-22), and each
// warp encodes tiles of 32 vectors:
//   load      the tile's rows, contiguous in memory, by coalesced 16-byte cp.async into the
//             warp's buffer, issued as soon as the previous tile has left it (for its registers)
//   norm      each lane takes one row from shared memory: its norm (of x scaled by a power of two:
//             finite for 1e20s, nonzero for 1e-30s), and the row scaled into fp16 range in place
//             (fp32 rows as two fp16 parts, hi + lo * 2^-11)
//   rotate    Y = X . Pi^T with mma.sync m16n8k16: X (two 16-vector m-tiles) is the A operand,
//             loaded into registers once per tile, so each Pi fragment (the B operand, read by
//             ldmatrix) serves all 32 vectors; 16 output coordinates at a time. Pi's rows are
//             stored permuted so that each lane's accumulators are consecutive coordinates
//   quantize  code = #{ midpoints < y / norm }: 2-3 bits by a branch-free search over midpoints in
//             registers (D = 128, fp16/bf16), otherwise one lookup in a 1024-entry table of
//             monotone buckets (exact: see encode_mma_kernel), the codes of 16 coordinates at once
//   pack      each lane appends its codes to its quarter of its rows' bit streams in registers,
//             stores whole words to a staging area, and the warp writes the packed rows coalesced
// Other head dims take the generic kernel: one warp per vector, Pi read through L1.
#include <math.h>

#include <algorithm>
#include <type_traits>

#include "tq_cuda_common.cuh"
#include "tq_encode_rows.cuh"
#include "tq_mma.cuh"

namespace tq_cuda {
namespace {

constexpr float kPartScale = 2048.f;  // 2^11: the lo part of a value is (v - hi) * 2^11

template <typename T>
struct InputType;
template <>
struct InputType<float> {
  static constexpr bool kTwoParts = true;  // fp32 does not fit one fp16 part
};
template <>
struct InputType<__half> {
  static constexpr bool kTwoParts = false;
};
template <>
struct InputType<__nv_bfloat16> {
  static constexpr bool kTwoParts = false;  // 8 mantissa bits: exact in fp16 once scaled into range
};

// Packs `dim` one-byte codes into the little-endian bit stream of `bits`-bit codes.
__device__ __forceinline__ void pack_row(const uint8_t* codes, int dim, int bits, uint8_t* out) {
  const int bytes = (dim * bits + 7) / 8;
  uint64_t acc = 0;
  int have = 0, written = 0;
  for (int i = 0; i < dim; ++i) {
    acc |= static_cast<uint64_t>(codes[i]) << have;
    have += bits;
    while (have >= 8) {
      out[written++] = static_cast<uint8_t>(acc);
      acc >>= 8;
      have -= 8;
    }
  }
  if (written < bytes) out[written] = static_cast<uint8_t>(acc);
}

// ---------------------------------------------------------------------------- tensor-core path

constexpr int kTileRows = 32;   // vectors per warp tile: two 16-row m-tiles of X
constexpr int kBuckets = 1024;  // quantizer lookup table entries
constexpr float kBucketRound = 12582912.f;  // 1.5 * 2^23: adding it rounds [0, 2^22) to an integer
constexpr int kBucketRoundBits = 0x4B400000;

constexpr size_t kMaxSharedBytes = 227 * 1024;  // sm_90's opt-in limit per block
constexpr size_t kSharedPerSm = 228 * 1024;     // a block also takes 1 KiB reserved by the system

// Codes of 2-3 bits at D = 128 from fp16/bf16 rows by the register search (Quantizer): it leaves
// the rotation and quantization one block of straight-line code that the compiler interleaves
// across n-block pairs at up to 255 registers, so such a CTA has 8 warps (elsewhere it spilled).
template <int D, typename T, int BITS>
__host__ __device__ constexpr bool register_quantizer() {
  return (BITS == 2 || BITS == 3) && D == 128 && !InputType<T>::kTwoParts;
}

template <int D, typename T, bool kEightWarps>
struct EncodeSmem {
  static constexpr int kPiStride = D + 8;  // halves per row: +16 bytes keeps ldmatrix rows in distinct banks
  static constexpr size_t kPi = size_t{2} * D * kPiStride * 2;  // hi, lo
  // A tile of raw rows as they arrive (cp.async), converted in place to the fp16 operand; +16
  // bytes per row keeps both ldmatrix rows and lane-per-row 16-byte accesses free of conflicts.
  // One buffer per warp: once X sits in registers the next tile loads into it (fp32 rows, whose
  // lo part is read from it throughout the rotation, only after the rotation).
  static constexpr int kXStride = D * static_cast<int>(sizeof(T)) + 16;
  static constexpr size_t kXBuf = size_t{kTileRows} * kXStride;
  static constexpr int kStageStride = D + 16;  // packed rows (<= D bytes) on their way out
  static constexpr size_t kStage = size_t{kTileRows} * kStageStride;
  static constexpr size_t kWarp = kXBuf + kStage;
  static constexpr size_t kTable = size_t{kBuckets} * 8;
  static constexpr size_t kBounds = 256 * 4;
  static constexpr size_t bytes(int warps) { return kPi + warps * kWarp + kTable + kBounds; }
  static constexpr bool two_fit(int warps) { return 2 * (bytes(warps) + 1024) <= kSharedPerSm; }
  // Warps hide the latencies of mma.sync chains, table lookups and loads: two CTAs of 8 where
  // they fit (D = 64, fp16/bf16), else one CTA of as many warps as shared memory holds (<= 12,
  // at most 168 registers a thread), or of 8 for the register quantizer.
  static constexpr int warps() {
    if (kEightWarps || two_fit(8)) return 8;
    int w = 12;
    while (w > 1 && bytes(w) > kMaxSharedBytes) --w;
    return w;
  }
  static constexpr int kWarps = warps();
  static constexpr size_t kBytes = bytes(kWarps);
  static constexpr int kMinBlocks = two_fit(kWarps) ? 2 : 1;
};

// 16 bytes global -> shared, or 16 zero bytes where src_bytes is 0 (rows past the end).
__device__ __forceinline__ void copy_async_16_fill(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}

// The lookup table's bucket of y: a monotone (non-decreasing) function of y, NaN -> 0. The table
// is built with this same function, which is all its exactness rests on (see encode_mma_kernel).
__device__ __forceinline__ int bucket_of(float y, float scale, float offset) {
  float u;
  asm("fma.rn.sat.f32 %0, %1, %2, %3;" : "=f"(u) : "f"(y), "f"(scale), "f"(offset));
  return __float_as_int(fmaf(u, static_cast<float>(kBuckets - 1), kBucketRound)) - kBucketRoundBits;
}

// code = #{ midpoints < y }, the reference's rule (a y on a midpoint takes the lower code).
// 2-3 bits: the midpoints sit in registers and a branch-free binary search picks the next one
// by selects (the count, for ascending midpoints). Wider codes: a lookup table (bucket_of).
template <int BITS, bool kRegisters>
struct Quantizer {
  const float2* table;  // [bucket] = (its first midpoint or +inf, midpoints below | count in it << 16)
  const float* bounds;
  float scale, offset;
  float m[kRegisters ? (1 << BITS) - 1 : 1];

  __device__ __forceinline__ uint32_t search(float y) const {
    if constexpr (BITS == 2) {
      return (m[0] < y ? 1u : 0u) + (m[1] < y ? 1u : 0u) + (m[2] < y ? 1u : 0u);
    } else {
      const bool p2 = m[3] < y;
      const bool p1 = (p2 ? m[5] : m[1]) < y;
      const bool p0 = (p2 ? (p1 ? m[6] : m[4]) : (p1 ? m[2] : m[0])) < y;
      return (p2 ? 4u : 0u) + (p1 ? 2u : 0u) + (p0 ? 1u : 0u);
    }
  }

  // codes of N coordinates at once: the table loads are independent, and the rare bucket
  // holding more than one midpoint is finished by a search among its midpoints afterwards
  template <int N>
  __device__ __forceinline__ void operator()(const float (&y)[N], uint32_t (&code)[N]) const {
    if constexpr (kRegisters) {
#pragma unroll
      for (int i = 0; i < N; ++i) code[i] = search(y[i]);
    } else {
      uint32_t info[N], any = 0;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float2 e = table[bucket_of(y[i], scale, offset)];
        info[i] = __float_as_uint(e.y);
        code[i] = (info[i] & 0xffffu) + (e.x < y[i] ? 1u : 0u);
        any |= info[i];
      }
      if (any >= (2u << 16)) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          if (info[i] < (2u << 16)) continue;
          int first = static_cast<int>(info[i] & 0xffffu), n = static_cast<int>(info[i] >> 16);
          while (n > 0) {  // #{ midpoints of the bucket < y }, added to those below it
            const int half = n >> 1;
            if (bounds[first + half] < y[i]) {
              first += half + 1;
              n -= half + 1;
            } else {
              n = half;
            }
          }
          code[i] = static_cast<uint32_t>(first);
        }
      }
    }
  }
};

// A code's `bits` bits at bit `pos` of a lane's segment of a packed row (`cur` holds the word
// being filled); D = 128 segments are whole words, D = 64 ones whole halfwords.
template <int D>
__device__ __forceinline__ void store_word(char* seg, int word, uint32_t w) {
  if constexpr (D == 128) {
    *reinterpret_cast<uint32_t*>(seg + 4 * word) = w;
  } else {
    uint16_t* h = reinterpret_cast<uint16_t*>(seg + 4 * word);
    h[0] = static_cast<uint16_t>(w);
    h[1] = static_cast<uint16_t>(w >> 16);
  }
}
template <int D>
__device__ __forceinline__ void append_code(uint32_t& cur, char* seg, int pos, uint32_t code, int bits) {
  const int shift = pos & 31;
  cur |= code << shift;
  if (shift + bits >= 32) {  // the word is full (bits <= 8: shift >= 24 here)
    store_word<D>(seg, pos >> 5, cur);
    cur = code >> (32 - shift);
  }
}

template <int D, typename T, int BITS>
using EncodeSmemFor = EncodeSmem<D, T, register_quantizer<D, T, BITS>()>;

// kHalfNorms: a.norms is float16 (store_norm)
template <int D, typename T, int BITS, bool kHalfNorms>
__global__ void __launch_bounds__(EncodeSmemFor<D, T, BITS>::kWarps * 32, EncodeSmemFor<D, T, BITS>::kMinBlocks)
    encode_mma_kernel(const EncodeArgs a) {
  using S = EncodeSmemFor<D, T, BITS>;
  constexpr int W = S::kWarps;
  constexpr int KS = D / 16;  // k steps of the mma
  constexpr int Q = D / 4;    // coordinates of a vector held by one lane of its quad
  constexpr bool kTwo = InputType<T>::kTwoParts;
  constexpr int kChunks = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte pieces of a row
  extern __shared__ float4 encode_smem[];
  char* smem = reinterpret_cast<char*>(encode_smem);
  __half* pi_hi = reinterpret_cast<__half*>(smem);
  __half* pi_lo = pi_hi + D * S::kPiStride;
  float2* table = reinterpret_cast<float2*>(smem + S::kPi + W * S::kWarp);
  float* bounds = reinterpret_cast<float*>(smem + S::kPi + W * S::kWarp + S::kTable);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  char* xbufs = smem + S::kPi + warp * S::kWarp;
  const int bits = BITS ? BITS : a.bits;

  const int64_t tiles = (a.rows + kTileRows - 1) / kTileRows;
  const int64_t tile_step = static_cast<int64_t>(gridDim.x) * W;
  // load: the whole tile (32 rows, contiguous in x) with coalesced 16-byte cp.async
  auto fetch = [&](int64_t tile, char* buf) {
    if (tile < tiles) {
      const char* src = static_cast<const char*>(a.x) + tile * kTileRows * D * static_cast<int64_t>(sizeof(T));
      const int64_t left = a.rows - tile * kTileRows;
      const int valid = static_cast<int>(left < kTileRows ? left : kTileRows);
#pragma unroll 4
      for (int i = lane; i < kTileRows * kChunks; i += 32) {
        const int r = i / kChunks, c = i % kChunks;
        const bool ok = r < valid;
        copy_async_16_fill(shared_address(buf + r * S::kXStride + c * 16), ok ? src + static_cast<size_t>(i) * 16 : a.x,
                           ok ? 16u : 0u);
      }
    }
    commit_copies();  // an empty group past the end keeps the wait count uniform
  };
  int64_t tile = static_cast<int64_t>(blockIdx.x) * W + warp;
  fetch(tile, xbufs);

  // Pi as hi + lo * 2^-11 fp16 parts, once per CTA, its rows permuted so that smem row 8j + n
  // is the coordinate that n-block j's column n computes: (n / 2) * Q + 2j + n % 2. Lane tig of
  // a quad then holds coordinates [tig * Q, tig * Q + Q) of its vectors, a contiguous piece of
  // the packed row, and each 8-row ldmatrix matrix reads 8 consecutive (conflict-free) rows.
  // Loads in batches of kPiBatch before their stores: one global latency per batch, not per
  // element (a decode step's cache update is one CTA whose time is mostly this prologue).
  constexpr int kPiBatch = 8;
  for (int e0 = threadIdx.x; e0 < D * D; e0 += kPiBatch * blockDim.x) {
    float p[kPiBatch];
#pragma unroll
    for (int u = 0; u < kPiBatch; ++u) {
      const int e = e0 + u * blockDim.x;
      const int s = e / D, k = e % D, j = s >> 3, n = s & 7;
      p[u] = e < D * D ? __ldg(a.rotation + ((n >> 1) * Q + 2 * j + (n & 1)) * D + k) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kPiBatch; ++u) {
      const int e = e0 + u * blockDim.x;
      if (e >= D * D) break;
      const int s = e / D, k = e % D;
      const __half hi = __float2half_rn(p[u]);
      pi_hi[s * S::kPiStride + k] = hi;
      pi_lo[s * S::kPiStride + k] = __float2half_rn((p[u] - __half2float(hi)) * kPartScale);
    }
  }
  const int nb = (1 << bits) - 1;
  for (int k = threadIdx.x; k < nb; k += blockDim.x) bounds[k] = (__ldg(a.codebook + k) + __ldg(a.codebook + k + 1)) * 0.5f;
  __syncthreads();

  // The quantizer table. With f = bucket_of (monotone), every midpoint m with f(m) < f(y) is
  // < y and every one with f(m) > f(y) is > y, so #{m < y} = #{m : f(m) < f(y)} plus the
  // comparisons of y with the midpoints in y's own bucket: exact, whatever the rounding in f.
  // The scale spreads [first midpoint, last midpoint] over the table (the Lloyd-Max codebooks
  // of D = 64 and 128 then put at most one midpoint in a bucket; more only cost a search).
  constexpr bool kRegisters = register_quantizer<D, T, BITS>();
  Quantizer<BITS, kRegisters> quant;
  quant.table = table;
  quant.bounds = bounds;
  if constexpr (kRegisters) {
#pragma unroll
    for (int i = 0; i < (1 << BITS) - 1; ++i) quant.m[i] = bounds[i];
  } else {
    const float first = bounds[0], last = bounds[nb - 1];
    float scale = 1.f, offset = 0.f;
    if (last > first) {
      const float s = 1.f / (last - first), o = -first * s;
      if (s <= 1e30f && fabsf(o) <= 1e30f) scale = s, offset = o;
    }
    auto below = [&](int b) {  // #{ m : f(m) < b }: f of the ascending midpoints is non-decreasing
      int lo = 0, n = nb;
      while (n > 0) {
        const int half = n >> 1;
        if (bucket_of(bounds[lo + half], scale, offset) < b) {
          lo += half + 1;
          n -= half + 1;
        } else {
          n = half;
        }
      }
      return lo;
    };
    for (int b = threadIdx.x; b < kBuckets; b += blockDim.x) {
      const int base = below(b), count = below(b + 1) - base;
      table[b] = make_float2(count > 0 ? bounds[base] : INFINITY, __uint_as_float(base | count << 16));
    }
    quant.scale = scale;
    quant.offset = offset;
    __syncthreads();
  }

  const uint32_t pi_hi_base = shared_address(pi_hi), pi_lo_base = shared_address(pi_lo);
  // ldmatrix row addresses. A (X, 16 vectors x 16 k): matrices (rows 0-7, k 0-7), (rows 8-15,
  // k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3]. B (Pi, two n-blocks x 16 k):
  // (block j, k 0-7), (block j, k 8-15), (block j+1, k 0-7), (block j+1, k 8-15) = b0, b1 of
  // block j, b0, b1 of block j+1 (smem row 8j + n holds column n of block j).
  const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_half = lane >> 4;
  const int b_row = (lane & 7) + 8 * (lane >> 4), b_col = 8 * ((lane >> 3) & 1);
  const int seg_bytes = Q * bits / 8;  // a lane's piece of a packed row
  const int packed = D * bits / 8;

  char* const buf = xbufs;
  char* const stage = xbufs + S::kXBuf;
  for (; tile < tiles; tile += tile_step) {
    wait_copies<0>();
    __syncwarp();

    // per row (lane = row): norm of x scaled by 2^-e (exact), and x * 2^-e into fp16 in place
    // (fp32: each 32-byte piece of 8 floats becomes its 8 hi halves then its 8 lo halves). fp16
    // rows need no scaling: their squares neither over- nor underflow in fp32.
    float sq = 0.f;
    int e = 0;
    {
      char* row_bytes = buf + lane * S::kXStride;
      if constexpr (std::is_same<T, __half>::value) {
#pragma unroll 4
        for (int i = 0; i < D / 8; ++i) {
          const uint4 q = *reinterpret_cast<const uint4*>(row_bytes + 16 * i);
          const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 v = half2_floats(w[k]);
            sq = fmaf(v.x, v.x, fmaf(v.y, v.y, sq));
          }
        }
      } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        float amax = 0.f;
#pragma unroll 4
        for (int i = 0; i < D / 8; ++i) {
          const uint4 q = *reinterpret_cast<const uint4*>(row_bytes + 16 * i);
          const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
          for (int k = 0; k < 4; ++k)
            amax = fmaxf(amax, fmaxf(fabsf(__uint_as_float(w[k] << 16)), fabsf(__uint_as_float(w[k] & 0xffff0000u))));
        }
        e = binade(amax);
        const float s = ldexpf(1.f, -e);
#pragma unroll 4
        for (int i = 0; i < D / 8; ++i) {
          uint4 q = *reinterpret_cast<const uint4*>(row_bytes + 16 * i);
          uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float v0 = __uint_as_float(w[k] << 16) * s, v1 = __uint_as_float(w[k] & 0xffff0000u) * s;
            sq = fmaf(v0, v0, fmaf(v1, v1, sq));
            w[k] = half2_bits(v0, v1);
          }
          q = make_uint4(w[0], w[1], w[2], w[3]);
          *reinterpret_cast<uint4*>(row_bytes + 16 * i) = q;
        }
      } else {
        float amax = 0.f;
#pragma unroll 4
        for (int i = 0; i < D / 4; ++i) {
          const float4 q = *reinterpret_cast<const float4*>(row_bytes + 16 * i);
          amax = fmaxf(amax, fmaxf(fmaxf(fabsf(q.x), fabsf(q.y)), fmaxf(fabsf(q.z), fabsf(q.w))));
        }
        e = binade(amax);
        const float s = ldexpf(1.f, -e);
#pragma unroll 2
        for (int i = 0; i < D / 8; ++i) {
          const float4 q0 = *reinterpret_cast<const float4*>(row_bytes + 32 * i);
          const float4 q1 = *reinterpret_cast<const float4*>(row_bytes + 32 * i + 16);
          const float v[8] = {q0.x * s, q0.y * s, q0.z * s, q0.w * s, q1.x * s, q1.y * s, q1.z * s, q1.w * s};
          uint32_t hi[4], lo[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            sq = fmaf(v[2 * k], v[2 * k], fmaf(v[2 * k + 1], v[2 * k + 1], sq));
            hi[k] = half2_bits(v[2 * k], v[2 * k + 1]);
            const float2 back = half2_floats(hi[k]);
            lo[k] = half2_bits((v[2 * k] - back.x) * kPartScale, (v[2 * k + 1] - back.y) * kPartScale);
          }
          *reinterpret_cast<uint4*>(row_bytes + 32 * i) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
          *reinterpret_cast<uint4*>(row_bytes + 32 * i + 16) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
        }
      }
    }
    const float scaled = sqrtf(sq);
    const float inv = scaled > 0.f ? 1.f / scaled : 0.f;  // y = 0 for a zero vector
    const float norm = ldexpf(scaled, e);
    const int64_t row = tile * kTileRows + lane;
    const int64_t dst = row < a.rows ? a.dest.destination(row) : -1;
    __syncwarp();

    // X (32 vectors x D) into registers as the A operand, held for the whole rotation: each Pi
    // fragment read from shared memory then serves both m-tiles.
    const uint32_t x_base = shared_address(buf);
    auto a_offset = [&](int mt, int ks) -> uint32_t {
      const int r = 16 * mt + a_row;
      if constexpr (kTwo) return r * S::kXStride + (2 * ks + a_half) * 32;  // hi; lo at +16
      else return r * S::kXStride + (16 * ks + 8 * a_half) * 2;
    };
    uint32_t xa[2][KS][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(xa[mt][ks], x_base + a_offset(mt, ks));
    float inv_row[2][2];  // the rows this lane's accumulators hold: 16 mt + 8 h + gid
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) inv_row[mt][h] = __shfl_sync(0xffffffffu, inv, 16 * mt + 8 * h + gid);
    if constexpr (!kTwo) {  // X is in registers: the buffer takes the next tile
      __syncwarp();
      fetch(tile + tile_step, buf);
    }
    // row 16 mt + 8 h + gid's segment: seg + (16 mt + 8 h) * kStageStride (immediate offsets)
    char* const seg = stage + gid * S::kStageStride + tig * seg_bytes;
    uint32_t cur[2][2] = {{0u, 0u}, {0u, 0u}};

    // rotate + quantize + pack, 16 output coordinates (two n-blocks) at a time: column n of
    // n-block j is coordinate (n / 2) * Q + 2j + n % 2, so this lane's accumulators c[0..1]
    // (row gid, columns 2tig, 2tig+1) and c[2..3] (row gid+8) are its local coordinates 2j and
    // 2j+1, appended in order to its segment of each row's bit stream.
#pragma unroll
    for (int p = 0; p < D / 16; ++p) {
      float hi[2][2][4], lo[2][2][4];  // [m-tile][n-block][c]
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) hi[mt][n][c] = lo[mt][n][c] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const uint32_t off = ((16 * p + b_row) * S::kPiStride + 16 * ks + b_col) * 2;
        uint32_t bh[4], bl[4];
        ldmatrix_x4(bh, pi_hi_base + off);
        ldmatrix_x4(bl, pi_lo_base + off);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t xl[4];
          if constexpr (kTwo) ldmatrix_x4(xl, x_base + a_offset(mt, ks) + 16);
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            mma_16816(hi[mt][n], xa[mt][ks], bh[2 * n], bh[2 * n + 1]);
            mma_16816(lo[mt][n], xa[mt][ks], bl[2 * n], bl[2 * n + 1]);  // the 2^-11 products, scaled once
            if constexpr (kTwo) mma_16816(lo[mt][n], xl, bh[2 * n], bh[2 * n + 1]);
          }
        }
      }
      // codes by n-block halves at D = 64 (fewer live registers: two blocks of this kernel fit an SM)
      constexpr int kBatch = D == 128 ? 16 : 8;
#pragma unroll
      for (int i0 = 0; i0 < 16; i0 += kBatch) {
        float y[kBatch];
        uint32_t code[kBatch];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {  // i0 + i = 8n + 4mt + c
          const int n = (i0 + i) >> 3, mt = ((i0 + i) >> 2) & 1, c = (i0 + i) & 3;
          y[i] = fmaf(lo[mt][n][c], 1.f / kPartScale, hi[mt][n][c]) * inv_row[mt][c >> 1];
        }
        quant(y, code);
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          const int n = (i0 + i) >> 3, mt = ((i0 + i) >> 2) & 1, c = (i0 + i) & 3;
          append_code<D>(cur[mt][c >> 1], seg + (16 * mt + 8 * (c >> 1)) * S::kStageStride,
                         (4 * p + 2 * n + (c & 1)) * bits, code[i], bits);
        }
      }
    }
    if constexpr (kTwo) {
      __syncwarp();
      fetch(tile + tile_step, buf);
    }
    if ((Q * bits) & 31) {  // D = 64, odd bits: the segment ends on a halfword
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          *reinterpret_cast<uint16_t*>(seg + (16 * mt + 8 * h) * S::kStageStride + 4 * ((Q * bits) >> 5)) = static_cast<uint16_t>(cur[mt][h]);
    }
    __syncwarp();

    // write: the tile's packed rows, coalesced, each to its destination row (or skipped)
    if (reinterpret_cast<uintptr_t>(a.codes) % 16 == 0 && packed % 16 == 0) {
      const int per_row = packed / 16;
      for (int i = lane; i < kTileRows * per_row; i += 32) {
        const int r = i / per_row, c = i - r * per_row;
        const int64_t d = __shfl_sync(0xffffffffu, dst, r);
        const uint4 v = *reinterpret_cast<const uint4*>(stage + r * S::kStageStride + 16 * c);
        if (d >= 0) *reinterpret_cast<uint4*>(a.codes + d * packed + 16 * c) = v;
      }
    } else {
      const int per_row = packed / 4;
      for (int i = lane; i < kTileRows * per_row; i += 32) {
        const int r = i / per_row, c = i - r * per_row;
        const int64_t d = __shfl_sync(0xffffffffu, dst, r);
        const uint32_t v = *reinterpret_cast<const uint32_t*>(stage + r * S::kStageStride + 4 * c);
        if (d >= 0) *reinterpret_cast<uint32_t*>(a.codes + d * packed + 4 * c) = v;
      }
    }
    if (dst >= 0) store_norm<kHalfNorms>(a.norms, dst, norm);
    __syncwarp();
  }
  wait_copies<0>();
}

// ---------------------------------------------------------------------------- generic path

constexpr int kGenericWarps = 4;

// One warp per vector: its norm (scaled), u = x / ||x|| in shared memory, y_j = <Pi row j, u>
// for j = lane, lane + 32, ... with Pi read through L1, codes staged then packed by lane 0..
template <typename T, bool kHalfNorms>
__global__ void __launch_bounds__(kGenericWarps * 32) encode_generic_kernel(const EncodeArgs a, int dim) {
  extern __shared__ float4 generic_smem[];
  float* bounds = reinterpret_cast<float*>(generic_smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* u = bounds + 256 + warp * dim;
  uint8_t* staged = reinterpret_cast<uint8_t*>(bounds + 256 + kGenericWarps * dim) + warp * dim;
  const int nb = (1 << a.bits) - 1;
  for (int k = threadIdx.x; k < nb; k += blockDim.x) bounds[k] = (__ldg(a.codebook + k) + __ldg(a.codebook + k + 1)) * 0.5f;
  __syncthreads();
  const T* x = static_cast<const T*>(a.x);
  const int64_t packed = (static_cast<int64_t>(dim) * a.bits + 7) / 8;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kGenericWarps) {
    const int64_t dst = a.dest.destination(row);
    if (dst < 0) continue;  // uniform over the warp
    const T* src = x + row * dim;
    float amax = 0.f;
    for (int i = lane; i < dim; i += 32) amax = fmaxf(amax, fabsf(to_float(src[i])));
    const int e = binade(warp_max(amax));
    const float s = ldexpf(1.f, -e);
    float sq = 0.f;
    for (int i = lane; i < dim; i += 32) {
      const float v = to_float(src[i]) * s;
      u[i] = v;
      sq = fmaf(v, v, sq);
    }
    const float scaled = sqrtf(warp_sum(sq));
    const float inv = scaled > 0.f ? 1.f / scaled : 0.f;
    __syncwarp();
    for (int j = lane; j < dim; j += 32) {
      const float* pi_row = a.rotation + static_cast<int64_t>(j) * dim;
      float dot = 0.f;
      for (int i = 0; i < dim; ++i) dot = fmaf(__ldg(pi_row + i), u[i], dot);
      staged[j] = static_cast<uint8_t>(quantize(dot * inv, bounds, a.bits));
    }
    __syncwarp();
    if (lane == 0) {
      pack_row(staged, dim, a.bits, a.codes + dst * packed);
      store_norm<kHalfNorms>(a.norms, dst, ldexpf(scaled, e));
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------- launch

template <typename T, bool kHalfNorms>
int launch_encode(const EncodeArgs& a, int64_t dim, cudaStream_t stream) {
  if (a.rows == 0) return 0;
  const int sms = num_sms();
  auto mma = [&](auto d) {
    constexpr int D = decltype(d)::value;
    auto launch = [&](auto bits) {
      constexpr int BITS = decltype(bits)::value;
      using S = EncodeSmemFor<D, T, BITS>;
      const auto kernel = encode_mma_kernel<D, T, BITS, kHalfNorms>;
      if (int rc = reserve_shared(kernel, S::kBytes)) return rc;
      int per_sm = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, S::kWarps * 32, S::kBytes) != cudaSuccess ||
          per_sm < 1) {
        cudaGetLastError();
        per_sm = 1;
      }
      const int64_t tiles = (a.rows + kTileRows * S::kWarps - 1) / (kTileRows * S::kWarps);
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, int64_t{sms} * per_sm));
      kernel<<<grid, S::kWarps * 32, S::kBytes, stream>>>(a);
      return launch_status();
    };
    switch (a.bits) {  // the common widths unrolled, the others with a runtime width
      case 2: return launch(std::integral_constant<int, 2>{});
      case 3: return launch(std::integral_constant<int, 3>{});
      case 4: return launch(std::integral_constant<int, 4>{});
      case 6: return launch(std::integral_constant<int, 6>{});
      case 8: return launch(std::integral_constant<int, 8>{});
      default: return launch(std::integral_constant<int, 0>{});
    }
  };
  // the tensor-core path loads rows with 16-byte loads and stores codes as 32-bit words
  const bool aligned = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(a.codes) % 4 == 0;
  if (aligned && dim == 64) return mma(std::integral_constant<int, 64>{});
  if (aligned && dim == 128) return mma(std::integral_constant<int, 128>{});
  const size_t shared = 256 * 4 + kGenericWarps * static_cast<size_t>(dim) * 5;
  if (shared > 200 * 1024) return TQ_CUDA_BAD_ARGUMENT;
  if (int rc = reserve_shared(encode_generic_kernel<T, kHalfNorms>, shared)) return rc;
  const int64_t blocks = (a.rows + kGenericWarps - 1) / kGenericWarps;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(blocks, int64_t{sms} * 16));
  encode_generic_kernel<T, kHalfNorms><<<grid, kGenericWarps * 32, shared, stream>>>(a, static_cast<int>(dim));
  return launch_status();
}

template <bool kHalfNorms>
int launch_encode_for(const EncodeArgs& a, tq_cuda_dtype type, int64_t dim, cudaStream_t stream) {
  switch (type) {
    case TQ_CUDA_FLOAT32: return launch_encode<float, kHalfNorms>(a, dim, stream);
    case TQ_CUDA_FLOAT16: return launch_encode<__half, kHalfNorms>(a, dim, stream);
    case TQ_CUDA_BFLOAT16: return launch_encode<__nv_bfloat16, kHalfNorms>(a, dim, stream);
  }
  return TQ_CUDA_BAD_ARGUMENT;
}

}  // namespace

int launch_encode_any(const EncodeArgs& a, tq_cuda_dtype type, int64_t dim, bool half_norms, cudaStream_t stream) {
  return half_norms ? launch_encode_for<true>(a, type, dim, stream) : launch_encode_for<false>(a, type, dim, stream);
}

}  // namespace tq_cuda

using namespace tq_cuda;

extern "C" int tq_cuda_encode(const tq_encode_call* c) {
  if (c == nullptr || c->rows < 0 || c->head_dim < 1 || c->head_dim > 8192 || !valid_bits(c->bits))
    return TQ_CUDA_BAD_ARGUMENT;
  EncodeArgs a{c->x, c->rows, c->rotation, c->codebook, c->bits, c->codes, c->norms, Rows{nullptr, nullptr, 1, 0, 0}};
  return launch_encode_any(a, static_cast<tq_cuda_dtype>(c->dtype), c->head_dim, false,
                           static_cast<cudaStream_t>(c->stream));
}

extern "C" size_t tq_cuda_encode_workspace(const tq_encode_call*) { return 0; }
