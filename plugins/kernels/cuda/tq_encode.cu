// TQEncode and TQCacheUpdate on the GPU (a cache update is an encode whose rows land in slots).
//
// Tensor-core path (head dim 64 or 128): a persistent CTA of 8 warps keeps Pi in shared memory as
// two fp16 parts (hi + lo * 2^-11, so that fp16 products accumulated in fp32 reproduce the fp32
// rotation to ~2^-22), and each warp encodes 32 vectors at a time:
//   load      each lane reads one vector, takes its norm (scaled by a power of two: finite for
//             1e20s, nonzero for 1e-30s) and stores it, scaled into fp16 range, in shared memory
//             (fp32 inputs as two fp16 parts, hi + lo * 2^-11)
//   rotate    Y^T = Pi . X^T with mma.sync m16n8k16 (Pi tiles are the A operand, 8 vectors the N),
//             64 output coordinates at a time
//   quantize  y / norm against the codebook's midpoints (binary search in shared memory)
//   pack      each lane packs one vector's codes (little-endian bit stream) and writes them
// Other head dims take the generic kernel: one warp per vector, Pi read through L1.
#include <math.h>

#include <algorithm>
#include <type_traits>

#include "tq_cuda_common.cuh"
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

// Where encoded row r goes: row r itself (TQEncode), or row slot[t] * H + h of the cache for
// r = t * H + h (TQCacheUpdate; skipped for a slot outside [0, N*B) and for a token that a later
// token with the same slot overrides: keep[t] == 0).
struct Rows {
  const int64_t* slots;  // nullptr: identity
  const uint8_t* keep;   // nullptr: every token writes
  int64_t heads, num_slots;
  __device__ __forceinline__ int64_t destination(int64_t r) const {
    if (slots == nullptr) return r;
    const int64_t t = r / heads;
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= num_slots || (keep != nullptr && !keep[t])) return -1;
    return slot * heads + (r - t * heads);
  }
};

struct EncodeArgs {
  const void* x;
  int64_t rows;
  const float* rotation;
  const float* codebook;
  int bits;
  uint8_t* codes;
  float* norms;
  Rows dest;
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

// 16 bytes of T as floats.
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void load(const float* p, float (&v)[4]) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  }
};
template <typename H>
struct Vec16Half {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void load(const H* p, float (&v)[8]) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const H* h = reinterpret_cast<const H*>(&w[i]);
      v[2 * i] = to_float(h[0]);
      v[2 * i + 1] = to_float(h[1]);
    }
  }
};
template <>
struct Vec16<__half> : Vec16Half<__half> {};
template <>
struct Vec16<__nv_bfloat16> : Vec16Half<__nv_bfloat16> {};

// Packs D one-byte codes (D * bits a multiple of 32) into 32-bit words of the little-endian bit
// stream, written one word at a time.
template <int D>
__device__ __forceinline__ void pack_words(const uint8_t* codes, int bits, uint32_t* out) {
  uint64_t acc = 0;
  int have = 0, word = 0;
#pragma unroll 8
  for (int i = 0; i < D; i += 4) {
    const uint32_t four = *reinterpret_cast<const uint32_t*>(codes + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      acc |= static_cast<uint64_t>((four >> (8 * k)) & 0xffu) << have;
      have += bits;
    }
    while (have >= 32) {
      out[word++] = static_cast<uint32_t>(acc);
      acc >>= 32;
      have -= 32;
    }
  }
}

constexpr int kRowsPerWarp = 32;  // four 8-vector N blocks
constexpr int kChunk = 64;        // output coordinates per accumulation pass (4 m-tiles)

constexpr size_t kMaxSharedBytes = 227 * 1024;  // sm_90's opt-in limit per block

template <int D, typename T, int W>
struct EncodeSmemOf {
  static constexpr int kWarps = W;
  static constexpr int kStride = D + 8;  // halves per row: +16 bytes keeps ldmatrix rows in distinct banks
  static constexpr int kParts = InputType<T>::kTwoParts ? 2 : 1;
  static constexpr size_t kPi = size_t{2} * D * kStride * 2;                   // hi, lo
  static constexpr size_t kX = size_t{kRowsPerWarp} * kStride * 2 * kParts;    // per warp
  static constexpr int kCodeStride = D + 16;  // bytes per staged row: +16 keeps lanes' rows in distinct banks
  static constexpr size_t kCodes = size_t{kRowsPerWarp} * kCodeStride;         // per warp
  static constexpr size_t kRowInfo = kRowsPerWarp * 8;                         // inverse scaled norm, norm
  static constexpr size_t kWarp = kX + kCodes + kRowInfo;
  static constexpr size_t kBounds = 256 * 4;
  static constexpr size_t kBytes = kPi + W * kWarp + kBounds;
};

// 8 warps per CTA where they fit in shared memory (fp16/bf16 rows), else 4 (fp32 rows at D = 128
// are two fp16 parts each: eight warps' rows and Pi would exceed the 227 KiB a block may have).
template <int D, typename T>
using EncodeSmem = std::conditional_t<EncodeSmemOf<D, T, 8>::kBytes <= kMaxSharedBytes, EncodeSmemOf<D, T, 8>,
                                      EncodeSmemOf<D, T, 4>>;

// The nearest centroid by binary search over the midpoints; BITS known at compile time unrolls
// it, so the independent searches of a thread overlap their shared-memory latencies.
template <int BITS>
__device__ __forceinline__ int quantize_bits(float y, const float* bounds, int bits) {
  if constexpr (BITS == 0) {
    return quantize(y, bounds, bits);
  } else {
    int code = 0;
#pragma unroll
    for (int step = 1 << (BITS - 1); step > 0; step >>= 1) code += bounds[code + step - 1] < y ? step : 0;
    return code;
  }
}

template <int D, typename T, int BITS>
__global__ void __launch_bounds__(EncodeSmem<D, T>::kWarps * 32) encode_mma_kernel(const EncodeArgs a) {
  using S = EncodeSmem<D, T>;
  constexpr int kEncodeWarps = S::kWarps;
  extern __shared__ float4 encode_smem[];
  char* smem = reinterpret_cast<char*>(encode_smem);
  __half* pi_hi = reinterpret_cast<__half*>(smem);
  __half* pi_lo = pi_hi + D * S::kStride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  char* mine = smem + S::kPi + warp * S::kWarp;
  __half* x_hi = reinterpret_cast<__half*>(mine);
  __half* x_lo = x_hi + kRowsPerWarp * S::kStride;  // fp32 inputs only
  uint8_t* staged = reinterpret_cast<uint8_t*>(mine + S::kX);
  float* row_info = reinterpret_cast<float*>(mine + S::kX + S::kCodes);  // [32] 1/||x s||, [32] ||x||
  float* bounds = reinterpret_cast<float*>(smem + S::kPi + kEncodeWarps * S::kWarp);

  // Pi as hi + lo * 2^-11 fp16 parts, and the codebook's midpoints, once per CTA.
  for (int e = threadIdx.x; e < D * D; e += blockDim.x) {
    const float p = __ldg(a.rotation + e);
    const __half hi = __float2half_rn(p);
    pi_hi[(e / D) * S::kStride + e % D] = hi;
    pi_lo[(e / D) * S::kStride + e % D] = __float2half_rn((p - __half2float(hi)) * kPartScale);
  }
  const int nb = (1 << a.bits) - 1;
  for (int k = threadIdx.x; k < nb; k += blockDim.x) bounds[k] = (__ldg(a.codebook + k) + __ldg(a.codebook + k + 1)) * 0.5f;
  __syncthreads();

  const T* x = static_cast<const T*>(a.x);
  const int64_t tiles = (a.rows + kRowsPerWarp - 1) / kRowsPerWarp;
  const int64_t packed = (static_cast<int64_t>(D) * a.bits + 7) / 8;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kEncodeWarps + warp; tile < tiles;
       tile += static_cast<int64_t>(gridDim.x) * kEncodeWarps) {
    // load: lane = one vector (16-byte loads); norm of x scaled by 2^-e (exact), x * 2^-e into fp16
    // (two parts for fp32). fp16 inputs need no scaling: their squares neither over- nor underflow.
    const int64_t row = tile * kRowsPerWarp + lane;
    const bool live = row < a.rows;
    {
      using V = Vec16<T>;
      const T* src = x + (live ? row : 0) * D;
      int e = 0;
      if constexpr (!std::is_same<T, __half>::value) {
        float amax = 0.f;
#pragma unroll 4
        for (int i = 0; i < D; i += V::kElems) {
          float v[V::kElems];
          V::load(src + i, v);
#pragma unroll
          for (int k = 0; k < V::kElems; ++k) amax = fmaxf(amax, fabsf(v[k]));
        }
        e = binade(amax);
      }
      const float s = ldexpf(1.f, -e);
      float sq = 0.f;
      __half* hi_row = x_hi + lane * S::kStride;
      __half* lo_row = x_lo + lane * S::kStride;
#pragma unroll 4
      for (int i = 0; i < D; i += V::kElems) {
        float v[V::kElems];
        V::load(src + i, v);
#pragma unroll
        for (int k = 0; k < V::kElems; k += 2) {
          const float v0 = live ? v[k] * s : 0.f, v1 = live ? v[k + 1] * s : 0.f;
          sq = fmaf(v0, v0, fmaf(v1, v1, sq));
          const uint32_t h = half2_bits(v0, v1);
          *reinterpret_cast<uint32_t*>(hi_row + i + k) = h;
          if constexpr (S::kParts == 2) {
            const float2 back = half2_floats(h);
            *reinterpret_cast<uint32_t*>(lo_row + i + k) = half2_bits((v0 - back.x) * kPartScale, (v1 - back.y) * kPartScale);
          }
        }
      }
      const float scaled = sqrtf(sq);
      row_info[lane] = scaled > 0.f ? 1.f / scaled : 0.f;  // y = 0 for a zero vector
      row_info[kRowsPerWarp + lane] = ldexpf(scaled, e);
    }
    __syncwarp();

    // rotate + quantize, kChunk output coordinates at a time
    const uint32_t pi_hi_base = shared_address(pi_hi), pi_lo_base = shared_address(pi_lo);
    const uint32_t x_hi_base = shared_address(x_hi), x_lo_base = shared_address(x_lo);
    // ldmatrix row addresses: A (Pi, 16x16 tile) matrices = (rows 0-7, k 0-7), (rows 8-15, k 0-7),
    // (rows 0-7, k 8-15), (rows 8-15, k 8-15); B (X, two 8-vector blocks x 16 k) matrices =
    // (block j, k 0-7), (block j, k 8-15), (block j+1, k 0-7), (block j+1, k 8-15).
    const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_col = 8 * (lane >> 4);
    const int b_row = (lane & 7) + 8 * (lane >> 4), b_col = 8 * ((lane >> 3) & 1);
#pragma unroll 1
    for (int c0 = 0; c0 < D; c0 += kChunk) {
      float acc[4][4][4];  // [m-tile][vector block][c]
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
#pragma unroll 2
      for (int k0 = 0; k0 < D; k0 += 16) {
        uint32_t xb[2][4], xl[2][4];  // [block pair][b0/b1 of block 2p, b0/b1 of block 2p+1]
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const uint32_t off = ((16 * p + b_row) * S::kStride + k0 + b_col) * 2;
          ldmatrix_x4(xb[p], x_hi_base + off);
          if constexpr (S::kParts == 2) ldmatrix_x4(xl[p], x_lo_base + off);
        }
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const uint32_t off = ((c0 + 16 * m + a_row) * S::kStride + k0 + a_col) * 2;
          uint32_t ah[4], al[4];
          ldmatrix_x4(ah, pi_hi_base + off);
          ldmatrix_x4(al, pi_lo_base + off);
          float lo_acc[4][4];  // the 2^-11 products, scaled once
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            lo_acc[j][0] = lo_acc[j][1] = lo_acc[j][2] = lo_acc[j][3] = 0.f;
            const uint32_t b0 = xb[j >> 1][2 * (j & 1)], b1 = xb[j >> 1][2 * (j & 1) + 1];
            mma_16816(acc[m][j], ah, b0, b1);
            mma_16816(lo_acc[j], al, b0, b1);
            if constexpr (S::kParts == 2) mma_16816(lo_acc[j], ah, xl[j >> 1][2 * (j & 1)], xl[j >> 1][2 * (j & 1) + 1]);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[m][j][c] = fmaf(lo_acc[j][c], 1.f / kPartScale, acc[m][j][c]);
        }
      }
      // acc[m][j][c]: coordinate c0 + 16m + gid (+8 for c >= 2), vector 8j + 2tig + (c & 1)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int v = 8 * j + 2 * tig + (c & 1);
          const float inv = row_info[v];
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            const int coord = c0 + 16 * m + gid + 8 * (c >> 1);
            staged[v * S::kCodeStride + coord] = static_cast<uint8_t>(quantize_bits<BITS>(acc[m][j][c] * inv, bounds, a.bits));
          }
        }
      }
    }
    __syncwarp();
    // pack: lane = one vector, written as 32-bit words (a packed row of D = 64 or 128 codes is a
    // whole number of words)
    const int64_t dst = live ? a.dest.destination(row) : -1;
    if (dst >= 0) {
      pack_words<D>(staged + lane * S::kCodeStride, a.bits, reinterpret_cast<uint32_t*>(a.codes + dst * packed));
      a.norms[dst] = row_info[kRowsPerWarp + lane];
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------- generic path

constexpr int kGenericWarps = 4;

// One warp per vector: its norm (scaled), u = x / ||x|| in shared memory, y_j = <Pi row j, u>
// for j = lane, lane + 32, ... with Pi read through L1, codes staged then packed by lane 0..
template <typename T>
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
      a.norms[dst] = ldexpf(scaled, e);
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------- launch

template <typename T>
int launch_encode(const EncodeArgs& a, int64_t dim, cudaStream_t stream) {
  if (a.rows == 0) return 0;
  const int sms = num_sms();
  auto mma = [&](auto d) {
    constexpr int D = decltype(d)::value;
    using S = EncodeSmem<D, T>;
    auto launch = [&](auto kernel) {
      if (int rc = reserve_shared(kernel, S::kBytes)) return rc;
      const int64_t tiles = (a.rows + kRowsPerWarp * S::kWarps - 1) / (kRowsPerWarp * S::kWarps);
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, sms));
      kernel<<<grid, S::kWarps * 32, S::kBytes, stream>>>(a);
      return launch_status();
    };
    switch (a.bits) {  // the common widths unrolled, the others searched with a runtime width
      case 2: return launch(encode_mma_kernel<D, T, 2>);
      case 3: return launch(encode_mma_kernel<D, T, 3>);
      case 4: return launch(encode_mma_kernel<D, T, 4>);
      case 6: return launch(encode_mma_kernel<D, T, 6>);
      case 8: return launch(encode_mma_kernel<D, T, 8>);
      default: return launch(encode_mma_kernel<D, T, 0>);
    }
  };
  // the tensor-core path loads rows with 16-byte loads and stores codes as 32-bit words
  const bool aligned = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(a.codes) % 4 == 0;
  if (aligned && dim == 64) return mma(std::integral_constant<int, 64>{});
  if (aligned && dim == 128) return mma(std::integral_constant<int, 128>{});
  const size_t shared = 256 * 4 + kGenericWarps * static_cast<size_t>(dim) * 5;
  if (shared > 200 * 1024) return TQ_CUDA_BAD_ARGUMENT;
  if (int rc = reserve_shared(encode_generic_kernel<T>, shared)) return rc;
  const int64_t blocks = (a.rows + kGenericWarps - 1) / kGenericWarps;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(blocks, int64_t{sms} * 16));
  encode_generic_kernel<T><<<grid, kGenericWarps * 32, shared, stream>>>(a, static_cast<int>(dim));
  return launch_status();
}

int launch_encode_any(const EncodeArgs& a, tq_cuda_dtype type, int64_t dim, cudaStream_t stream) {
  switch (type) {
    case TQ_CUDA_FLOAT32: return launch_encode<float>(a, dim, stream);
    case TQ_CUDA_FLOAT16: return launch_encode<__half>(a, dim, stream);
    case TQ_CUDA_BFLOAT16: return launch_encode<__nv_bfloat16>(a, dim, stream);
  }
  return TQ_CUDA_BAD_ARGUMENT;
}

// keep[t] = 1 when no later token names slot_mapping[t] (the last writer of a slot wins).
// Few tokens (a decode step): each CTA compares its 256 tokens with every later token, 256 at a
// time through shared memory. Many tokens (a prefill): an open-addressing table keyed by slot
// keeps the largest token index of each slot (atomicMax), then each token checks it is that one:
// linear in the tokens, where the pairwise comparison is quadratic.
constexpr int kDedupThreads = 256;
constexpr int64_t kPairwiseTokens = 4096;
constexpr unsigned long long kEmptySlot = ~0ull;

__global__ void __launch_bounds__(kDedupThreads) last_writer_kernel(const int64_t* slots, int64_t tokens,
                                                                    uint8_t* keep) {
  __shared__ int64_t later[kDedupThreads];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kDedupThreads + threadIdx.x;
  const int64_t mine = t < tokens ? slots[t] : -1;
  bool overridden = false;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kDedupThreads; base < tokens; base += kDedupThreads) {
    __syncthreads();
    const int64_t u = base + threadIdx.x;
    later[threadIdx.x] = u < tokens ? slots[u] : -1;
    __syncthreads();
    for (int i = 0; i < kDedupThreads; ++i) overridden |= base + i > t && later[i] == mine;
  }
  if (t < tokens) keep[t] = !overridden;
}

struct SlotTable {
  unsigned long long* keys;  // slot, or kEmptySlot
  int* last;                 // the largest token index that names keys[h]
  uint32_t mask;             // capacity - 1 (a power of two >= 2 * tokens)
  __device__ __forceinline__ uint32_t home(int64_t slot) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(slot) * 0x9E3779B97F4A7C15ull) >> 32) & mask;
  }
};

__global__ void __launch_bounds__(kDedupThreads) slot_table_insert(const int64_t* slots, int64_t tokens,
                                                                   SlotTable table) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kDedupThreads + threadIdx.x;
  if (t >= tokens) return;
  const int64_t slot = slots[t];
  if (slot < 0) return;  // skipped tokens need no entry
  for (uint32_t h = table.home(slot);; h = (h + 1) & table.mask) {
    const unsigned long long prev = atomicCAS(table.keys + h, kEmptySlot, static_cast<unsigned long long>(slot));
    if (prev == kEmptySlot || prev == static_cast<unsigned long long>(slot)) {
      atomicMax(table.last + h, static_cast<int>(t));
      return;
    }
  }
}

__global__ void __launch_bounds__(kDedupThreads) slot_table_keep(const int64_t* slots, int64_t tokens,
                                                                 SlotTable table, uint8_t* keep) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kDedupThreads + threadIdx.x;
  if (t >= tokens) return;
  const int64_t slot = slots[t];
  if (slot < 0) {
    keep[t] = 0;
    return;
  }
  uint32_t h = table.home(slot);
  while (table.keys[h] != static_cast<unsigned long long>(slot)) h = (h + 1) & table.mask;
  keep[t] = table.last[h] == static_cast<int>(t);
}

uint32_t table_capacity(int64_t tokens) {
  uint32_t capacity = 1;
  while (capacity < 2 * tokens) capacity <<= 1;
  return capacity;
}

size_t dedupe_bytes(int64_t tokens) {
  if (tokens <= 1) return 0;
  size_t bytes = align256(static_cast<size_t>(tokens));
  if (tokens > kPairwiseTokens) bytes += align256(size_t{table_capacity(tokens)} * 12);
  return bytes;
}

// Fills keep[0, tokens) (workspace of dedupe_bytes(tokens)); returns the launches' status.
int last_writers(const int64_t* slots, int64_t tokens, void* workspace, uint8_t* keep_out[1], cudaStream_t stream) {
  uint8_t* keep = static_cast<uint8_t*>(workspace);
  *keep_out = keep;
  const unsigned grid = static_cast<unsigned>((tokens + kDedupThreads - 1) / kDedupThreads);
  if (tokens <= kPairwiseTokens) {
    last_writer_kernel<<<grid, kDedupThreads, 0, stream>>>(slots, tokens, keep);
    return launch_status();
  }
  const uint32_t capacity = table_capacity(tokens);
  char* base = static_cast<char*>(workspace) + align256(static_cast<size_t>(tokens));
  SlotTable table{reinterpret_cast<unsigned long long*>(base), reinterpret_cast<int*>(base + size_t{capacity} * 8),
                  capacity - 1};
  // keys all kEmptySlot and last all -1: both are the all-ones bytes
  if (cudaError_t rc = cudaMemsetAsync(base, 0xff, size_t{capacity} * 12, stream)) return static_cast<int>(rc);
  slot_table_insert<<<grid, kDedupThreads, 0, stream>>>(slots, tokens, table);
  slot_table_keep<<<grid, kDedupThreads, 0, stream>>>(slots, tokens, table, keep);
  return launch_status();
}

}  // namespace
}  // namespace tq_cuda

using namespace tq_cuda;

extern "C" int tq_cuda_encode(const void* x, tq_cuda_dtype x_type, int64_t rows, int64_t dim, const float* rotation,
                              const float* codebook, int bits, uint8_t* codes, float* norms, cudaStream_t stream) {
  if (rows < 0 || dim < 1 || dim > 8192 || !valid_bits(bits)) return TQ_CUDA_BAD_ARGUMENT;
  EncodeArgs a{x, rows, rotation, codebook, bits, codes, norms, Rows{nullptr, nullptr, 1, 0}};
  return launch_encode_any(a, x_type, dim, stream);
}

extern "C" size_t tq_cuda_cache_update_workspace(int64_t num_tokens) { return dedupe_bytes(num_tokens); }

extern "C" int tq_cuda_cache_update(const void* key, const void* value, tq_cuda_dtype kv_type,
                                    const int64_t* slot_mapping, int64_t num_tokens, int64_t num_kv_heads,
                                    int64_t head_dim, uint8_t* k_codes, float* k_norms, uint8_t* v_codes,
                                    float* v_norms, int64_t num_blocks, int64_t block_size, const float* rotation,
                                    const float* k_codebook, const float* v_codebook, int k_bits, int v_bits,
                                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (num_tokens < 0 || num_tokens > (int64_t{1} << 30) || num_kv_heads < 1 || head_dim < 1 || head_dim > 8192 ||
      num_blocks < 0 || block_size < 1 || !valid_bits(k_bits) || !valid_bits(v_bits))
    return TQ_CUDA_BAD_ARGUMENT;
  if (num_tokens == 0) return 0;
  uint8_t* keep = nullptr;
  if (num_tokens > 1) {
    if (workspace == nullptr || workspace_bytes < dedupe_bytes(num_tokens)) return TQ_CUDA_BAD_ARGUMENT;
    if (int rc = last_writers(slot_mapping, num_tokens, workspace, &keep, stream)) return rc;
  }
  const Rows dest{slot_mapping, keep, num_kv_heads, num_blocks * block_size};
  const int64_t rows = num_tokens * num_kv_heads;
  EncodeArgs k{key, rows, rotation, k_codebook, k_bits, k_codes, k_norms, dest};
  if (int rc = launch_encode_any(k, kv_type, head_dim, stream)) return rc;
  EncodeArgs v{value, rows, rotation, v_codebook, v_bits, v_codes, v_norms, dest};
  return launch_encode_any(v, kv_type, head_dim, stream);
}
