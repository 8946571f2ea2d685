// TQPagedAttention on the tensor cores (flash-decoding in the rotated domain), for 2- and 4-bit
// keys and values, D in {64, 128, 256}, up to 8 query heads per KV head, blocks of 16k tokens.
//
// Three launches:
//   rotate_query   q_rot = (Pi q) * scale * log2(e), float32 [S*Hq, D]
//   split          one warp per (sequence, KV head, split of the context), 16 tokens per step:
//                    S^T[16 tok x 8 heads] = K[16 tok x D] . q_rot^T      (K is the A operand)
//                    online softmax (base 2) per head;  P' = P * ||v||
//                    O^T[D x 8 heads]     += V^T[D x 16 tok] . P'^T       (V^T is the A operand)
//                  K and V are dequantized from the packed cache straight into A fragments
//                  (tq_mma_fragments.cuh); P' reaches the B layout with movmatrix.
//                  Writes the split's running max m, sum l and accumulator acc.
//   merge_rotate   merges the splits and rotates back: out = Pi^T (acc / l).
//
// With the query group as the mma's N (8 columns) instead of its M (16 rows) the tensor cores do
// half the padded work of a q-as-A layout, and each lane owns whole 4..32-byte runs of a row.
#include <math.h>

#include <algorithm>
#include <type_traits>

#include "tq_cuda_common.cuh"
#include "tq_mma_fragments.cuh"

namespace tq_cuda {
namespace mma {
namespace {

constexpr int kTile = 16;              // tokens per step
constexpr int kMaxGroup = 8;           // the mma's N
constexpr int kMaxSplits = 1024;
constexpr int kTargetWarpsPerSm = 32;  // split the context until about this many warps exist
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNoScore = -1.0e30f;   // running max before any token (finite: no inf - inf)

template <int D, int KBITS, int VBITS>
struct Layout {
  static constexpr int kSteps = D / 16;                // k-steps of K.q^T, m-tiles of V^T.P^T
  static constexpr int kWarps = D <= 128 ? 16 : 8;     // per CTA (one CTA per SM at 128 registers)
  static constexpr int kStages = D <= 128 ? 4 : 3;     // tiles in a warp's shared-memory ring
  static constexpr int kKeyRowBytes = D * KBITS / 8;
  static constexpr int kValueRowBytes = D * VBITS / 8;
  static constexpr int kKeyBytes = kKeyRowBytes / 4;   // a lane's quarter of a key row
  static constexpr int kKeyWords = kKeyBytes / 4;
  static constexpr int kValueBytes = kValueRowBytes / 8;  // a lane's eighth of a value row
  static constexpr int kValueWords = kValueBytes >= 4 ? kValueBytes / 4 : 1;
  static constexpr int kValueWordBytes = kValueBytes >= 4 ? 4 : kValueBytes;  // bytes used per word
  static_assert(kKeyBytes >= 4 && kValueBytes >= 2, "D * bits too small for the fragment layout");

  // Coordinates (within the lane's quarter of the row) of q's k-step `step` slots: pair 0 holds
  // k = 2tig, 2tig+1, pair 1 holds k = 2tig+8, 2tig+9 (Codebook<BITS>::pairs decides the order).
  __device__ static constexpr int key_coord(int step, int pair, int elem) {
    return KBITS == 4 ? 4 * step + 2 * pair + elem : 4 * step + pair + 2 * elem;
  }
  // Coordinate (within the lane's eighth of the row) of accumulator m-tile `mt`, row gid (+8 if hi).
  __device__ static constexpr int value_coord(int mt, int hi) {
    if (VBITS == 4) return 8 * (mt / 4) + 2 * (mt % 4) + hi;
    constexpr int j = kValueWordBytes;  // 2-bit: bytes per word, tiles = 2 * j per word
    return 16 * (mt / (2 * j)) + 4 * (mt % j) + 2 * ((mt % (2 * j)) / j) + hi;
  }
};

// How a lane turns packed codes into fp16 pairs: a shared-memory pair table for 4 bits, byte
// permutes over a register codebook for 2 bits.
template <int BITS>
using Dequant = typename std::conditional<BITS == 4, PairTable, Codebook<2>>::type;

struct SplitArgs {
  const float* q_rot;
  const uint8_t* k_codes;
  const float* k_norms;
  const uint8_t* v_codes;
  const float* v_norms;
  const int32_t* block_tables;
  const int32_t* context_lens;
  const float* k_codebook;
  const float* v_codebook;
  int num_pairs, num_kv_heads, group, block_size, max_blocks, num_blocks, tokens_per_split, num_splits;
  int shared_codebook;  // k_codebook == v_codebook: one pair table serves both
  int table_bytes;      // pair tables at the front of the dynamic shared memory
  float* part_m;    // [pairs, splits, group]
  float* part_l;    // [pairs, splits, group]
  float* part_acc;  // [pairs, splits, group, D]
};

// One tile as it sits in a warp's shared-memory stage: key rows in token order, value rows in the
// order tig + 4r for token 2tig + (r & 1) + 8 (r >> 1) (the 8 lanes of one r then read 4 contiguous
// rows: no bank conflicts), then the 16 key norms and the 16 value norms.
template <int D, int KBITS, int VBITS>
struct Stage {
  using L = Layout<D, KBITS, VBITS>;
  static constexpr int kKey = 0;
  static constexpr int kValue = kTile * L::kKeyRowBytes;
  static constexpr int kKeyNorm = kValue + kTile * L::kValueRowBytes;
  static constexpr int kValueNorm = kKeyNorm + kTile * 4;
  static constexpr int kBytes = kValueNorm + kTile * 4;
  static_assert(kValue % 16 == 0 && kKeyNorm % 16 == 0 && kBytes % 16 == 0, "16-byte aligned parts");
  __device__ static constexpr int value_row(int token) { return (token & 8) | ((token & 1) << 2) | ((token >> 1) & 3); }
};

__device__ __forceinline__ void copy_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void copy_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// A lane's part in copying a tile into a stage: which 16-byte chunks of which rows (offsets from the
// tile's first cell, fixed for the whole loop) and one norm (lanes 0-15 key norms, 16-31 value norms).
template <int D, int KBITS, int VBITS>
struct TileCopy {
  using L = Layout<D, KBITS, VBITS>;
  using S = Stage<D, KBITS, VBITS>;
  static constexpr int kKeyChunks = kTile * L::kKeyRowBytes / 16, kValueChunks = kTile * L::kValueRowBytes / 16;
  static constexpr int kKeyPerLane = (kKeyChunks + 31) / 32, kValuePerLane = (kValueChunks + 31) / 32;
  int64_t key_src[kKeyPerLane], value_src[kValuePerLane], norm_src;
  uint32_t key_dst[kKeyPerLane], value_dst[kValuePerLane], norm_dst;
  bool key_lane[kKeyPerLane], value_lane[kValuePerLane], key_norm;

  __device__ __forceinline__ TileCopy(int lane, int64_t kv_heads) {
#pragma unroll
    for (int i = 0; i < kKeyPerLane; ++i) {
      const int c = lane + 32 * i, t = c / (L::kKeyRowBytes / 16), part = c % (L::kKeyRowBytes / 16);
      key_lane[i] = c < kKeyChunks;
      key_src[i] = t * kv_heads * L::kKeyRowBytes + part * 16;
      key_dst[i] = S::kKey + t * L::kKeyRowBytes + part * 16;
    }
#pragma unroll
    for (int i = 0; i < kValuePerLane; ++i) {
      const int c = lane + 32 * i, t = c / (L::kValueRowBytes / 16), part = c % (L::kValueRowBytes / 16);
      value_lane[i] = c < kValueChunks;
      value_src[i] = t * kv_heads * L::kValueRowBytes + part * 16;
      value_dst[i] = S::kValue + S::value_row(t) * L::kValueRowBytes + part * 16;
    }
    key_norm = lane < 16;
    norm_src = (lane & 15) * kv_heads;
    norm_dst = (key_norm ? S::kKeyNorm : S::kValueNorm) + 4 * (lane & 15);
  }

  // The whole warp copies the 16 tokens starting at cache cell `first` (of a KV head) into `stage`.
  __device__ __forceinline__ void issue(const SplitArgs& a, int64_t first, uint32_t stage) const {
    const uint8_t* k = a.k_codes + first * L::kKeyRowBytes;
    const uint8_t* v = a.v_codes + first * L::kValueRowBytes;
#pragma unroll
    for (int i = 0; i < kKeyPerLane; ++i)
      if (key_lane[i]) copy_async_16(stage + key_dst[i], k + key_src[i]);
#pragma unroll
    for (int i = 0; i < kValuePerLane; ++i)
      if (value_lane[i]) copy_async_16(stage + value_dst[i], v + value_src[i]);
    copy_async_4(stage + norm_dst, (key_norm ? a.k_norms : a.v_norms) + first + norm_src);
  }
};

template <int BYTES>
__device__ __forceinline__ void load_shared(const uint8_t* p, uint32_t* w) {
  if constexpr (BYTES >= 16) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = v.x;
      w[4 * i + 1] = v.y;
      w[4 * i + 2] = v.z;
      w[4 * i + 3] = v.w;
    }
  } else if constexpr (BYTES == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else if constexpr (BYTES == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    static_assert(BYTES == 2, "2, 4, 8, 16 or 32 bytes");
    w[0] = *reinterpret_cast<const unsigned short*>(p);
  }
}

// A lane's share of one tile, read from its stage.
template <int D, int KBITS, int VBITS>
struct Tile {
  using L = Layout<D, KBITS, VBITS>;
  uint32_t k[2][L::kKeyWords];    // rows gid, gid+8: the lane's quarter
  uint32_t v[4][L::kValueWords];  // tokens 2tig, 2tig+1, 2tig+8, 2tig+9: the lane's eighth

  __device__ __forceinline__ void read(const uint8_t* stage, int gid, int tig) {
    using S = Stage<D, KBITS, VBITS>;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      load_shared<L::kKeyBytes>(stage + S::kKey + (gid + 8 * r) * L::kKeyRowBytes + tig * L::kKeyBytes, k[r]);
#pragma unroll
    for (int r = 0; r < 4; ++r)
      load_shared<L::kValueBytes>(stage + S::kValue + (tig + 4 * r) * L::kValueRowBytes + gid * L::kValueBytes, v[r]);
  }
};

// S^T (tokens gid, gid+8 x heads 2tig, 2tig+1) of one tile: K rows from the cache, q^T from qb.
template <int D, int KBITS, int VBITS>
__device__ __forceinline__ void key_scores(const Tile<D, KBITS, VBITS>& tile, const Dequant<KBITS>& dq,
                                           const uint32_t (&qb)[D / 16][2], float (&s)[4]) {
  using L = Layout<D, KBITS, VBITS>;
  float s2[4] = {0.f, 0.f, 0.f, 0.f};  // odd k-steps: two dependent mma chains of half the length
#pragma unroll
  for (int w = 0; w < L::kKeyWords; ++w) {
    if constexpr (KBITS == 4) {
      // byte b of the quarter = coordinates (2b, 2b+1); k-step st takes bytes 2st, 2st+1
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint32_t frag[4] = {dq(byte_of(tile.k[0][w], 2 * j)), dq(byte_of(tile.k[1][w], 2 * j)),
                                  dq(byte_of(tile.k[0][w], 2 * j + 1)), dq(byte_of(tile.k[1][w], 2 * j + 1))};
        mma_16816(j ? s2 : s, frag, qb[2 * w + j][0], qb[2 * w + j][1]);
      }
    } else {
      uint32_t e0[4], o0[4], e1[4], o1[4];
      dq.pairs(tile.k[0][w], e0, o0);
      dq.pairs(tile.k[1][w], e1, o1);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t frag[4] = {e0[j], e1[j], o0[j], o1[j]};
        mma_16816(j & 1 ? s2 : s, frag, qb[4 * w + j][0], qb[4 * w + j][1]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) s[e] += s2[e];
}

// acc (m-tiles of O^T) += V^T . P'^T for one tile; p0/p1 = P'^T B fragments (tokens 0-7 / 8-15).
template <int D, int KBITS, int VBITS>
__device__ __forceinline__ void accumulate_values(const Tile<D, KBITS, VBITS>& tile, const Dequant<VBITS>& dq,
                                                  uint32_t p0, uint32_t p1, float (&acc)[D / 16][4]) {
  using L = Layout<D, KBITS, VBITS>;
#pragma unroll
  for (int w = 0; w < L::kValueWords; ++w) {
    if constexpr (VBITS == 4) {
      // interleaving two tokens' words first makes byte b = (token x, token y) codes of one coordinate,
      // so each lookup is a whole A-fragment register: m-tile b of the word takes coordinates 2b, 2b+1
      const uint32_t ex = interleave_even(tile.v[0][w], tile.v[1][w]), ox = interleave_odd(tile.v[0][w], tile.v[1][w]);
      const uint32_t e8 = interleave_even(tile.v[2][w], tile.v[3][w]), o8 = interleave_odd(tile.v[2][w], tile.v[3][w]);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t frag[4] = {dq(byte_of(ex, b)), dq(byte_of(ox, b)), dq(byte_of(e8, b)), dq(byte_of(o8, b))};
        mma_16816(acc[4 * w + b], frag, p0, p1);
      }
    } else {
      constexpr int J = L::kValueWordBytes;
#pragma unroll
      for (int ui = 0; ui < 2; ++ui) {
        const uint32_t ua = ui ? interleave_odd(tile.v[0][w], tile.v[1][w]) : interleave_even(tile.v[0][w], tile.v[1][w]);
        const uint32_t ub = ui ? interleave_odd(tile.v[2][w], tile.v[3][w]) : interleave_even(tile.v[2][w], tile.v[3][w]);
        uint32_t ea[4], oa[4], eb[4], ob[4];
        dq.pairs(ua, ea, oa);
        dq.pairs(ub, eb, ob);
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const uint32_t frag[4] = {ea[j], oa[j], eb[j], ob[j]};
          mma_16816(acc[2 * J * w + J * ui + j], frag, p0, p1);
        }
      }
    }
  }
}

__device__ __forceinline__ float group_max(float v) {  // over the 8 lanes of one tig
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
}
__device__ __forceinline__ float group_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  return v + __shfl_xor_sync(0xffffffffu, v, 16);
}

// A warp's running (m, l) per head (l already summed over the warp) and its accumulator, written
// as m_out[head], l_out[head] (stride `row` between heads) and acc_out[head * row + d].
template <int D, int KBITS, int VBITS>
__device__ __forceinline__ void store_partial(const SplitArgs& a, int64_t part, const float (&m)[2], const float (&l)[2],
                                              const float (&acc)[D / 16][4], int gid, int tig, float* m_out,
                                              float* l_out, float* acc_out, int row = -1) {
  using L = Layout<D, KBITS, VBITS>;
  const int stride = row < 0 ? D : row;
  const int64_t ml = row < 0 ? part * a.group : 0;
  const int ml_stride = row < 0 ? 1 : row;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int head = 2 * tig + c;
    if (gid == 0 && head < a.group) {
      m_out[ml + head * ml_stride] = m[c];
      l_out[ml + head * ml_stride] = l[c];
    }
  }
#pragma unroll
  for (int mt = 0; mt < L::kSteps; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int head = 2 * tig + (e & 1);
      if (head < a.group) acc_out[head * stride + gid * (D / 8) + L::value_coord(mt, e >> 1)] = acc[mt][e];
    }
}

template <int D, int KBITS, int VBITS>
__global__ void __launch_bounds__(Layout<D, KBITS, VBITS>::kWarps * 32) split_kernel(const SplitArgs a) {
  using L = Layout<D, KBITS, VBITS>;
  using S = Stage<D, KBITS, VBITS>;
  constexpr int kStages = L::kStages;
  extern __shared__ float4 split_smem[];  // pair tables, then the warps' rings
  uint32_t* tables = reinterpret_cast<uint32_t*>(split_smem);
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3, warp = threadIdx.x >> 5;
  const bool own_value_table = VBITS == 4 && !(KBITS == 4 && a.shared_codebook);
  uint32_t* value_table = tables + (KBITS == 4 && own_value_table ? kPairTableWords : 0);
  if constexpr (KBITS == 4) fill_pair_table(tables, a.k_codebook);
  if (own_value_table) fill_pair_table(value_table, a.v_codebook);
  __syncthreads();  // the only CTA barrier

  const int work = blockIdx.x * L::kWarps + warp;
  // num_splits a multiple of kWarps: a CTA holds kWarps splits of one pair and merges them itself
  const bool cta_merge = a.num_splits % L::kWarps == 0;
  if (work >= a.num_pairs * a.num_splits) return;  // whole warps only (never with cta_merge)
  const int pair = work / a.num_splits, split = work % a.num_splits;
  const int seq = pair / a.num_kv_heads, h = pair % a.num_kv_heads;
  const uint8_t* ring = reinterpret_cast<const uint8_t*>(split_smem) + a.table_bytes + warp * kStages * S::kBytes;
  const uint32_t ring_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  int ctx = __ldg(a.context_lens + seq);
  ctx = max(0, min(ctx, a.max_blocks * a.block_size));
  const int start = split * a.tokens_per_split;
  const int end = min(start + a.tokens_per_split, ctx);
  const int tiles = start < end ? (end - start + kTile - 1) / kTile : 0;
  const int32_t* table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks;

  // Block-table entries of 32 tiles at a time (lane l: tile 32k + l), the next 32 loaded early;
  // the issuing position (entry, offset in the block) advances by 16 tokens without a division.
  auto table_chunk = [&](int k) {
    const int tile = 32 * k + lane;
    return tile < tiles ? __ldg(table + (start + kTile * tile) / a.block_size) : 0;
  };
  int blocks = table_chunk(0), blocks_next = table_chunk(1);
  int offset = start % a.block_size;
  uint32_t listed = 0;  // bit (tile & 31): the tile's block-table entry is in [0, num_blocks)
  const TileCopy<D, KBITS, VBITS> copy(lane, a.num_kv_heads);
  auto issue = [&](int tile) {
    if (tile > 0 && (tile & 31) == 0) {
      blocks = blocks_next;
      blocks_next = table_chunk((tile >> 5) + 1);
    }
    const int block = __shfl_sync(0xffffffffu, blocks, tile & 31);
    const bool ok = block >= 0 && block < a.num_blocks;
    listed = ok ? listed | (1u << (tile & 31)) : listed & ~(1u << (tile & 31));
    const int64_t first = (static_cast<int64_t>(ok ? block : 0) * a.block_size + offset) * a.num_kv_heads + h;
    copy.issue(a, first, ring_addr + (tile % kStages) * S::kBytes);
    offset += kTile;
    if (offset == a.block_size) offset = 0;
  };
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < tiles) issue(j);
    commit_copies();
  }

  Dequant<KBITS> kcb;
  Dequant<VBITS> vcb;
  if constexpr (KBITS == 4) kcb.lane_base = static_cast<uint32_t>(__cvta_generic_to_shared(tables + lane));
  else kcb.load(a.k_codebook);
  if constexpr (VBITS == 4) vcb.lane_base = static_cast<uint32_t>(__cvta_generic_to_shared(value_table + lane));
  else vcb.load(a.v_codebook);

  // q^T B fragments: column gid = query head gid of the group, rows = this lane's key coordinates.
  uint32_t qb[L::kSteps][2];
  {
    const bool head = gid < a.group;
    const float* q = a.q_rot + (static_cast<int64_t>(pair) * a.group + (head ? gid : 0)) * D + tig * (D / 4);
#pragma unroll
    for (int st = 0; st < L::kSteps; ++st)
#pragma unroll
      for (int p = 0; p < 2; ++p)
        qb[st][p] = head ? half2_bits(q[L::key_coord(st, p, 0)], q[L::key_coord(st, p, 1)]) : 0u;
  }

  float acc[L::kSteps][4];
#pragma unroll
  for (int mt = 0; mt < L::kSteps; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  float m[2] = {kNoScore, kNoScore}, l[2] = {0.f, 0.f};  // heads 2tig, 2tig+1

  for (int i = 0; i < tiles; ++i) {
    if (i + kStages - 1 < tiles) issue(i + kStages - 1);
    commit_copies();
    wait_copies<kStages - 1>();  // tile i has landed
    __syncwarp();
    const uint8_t* stage = ring + (i % kStages) * S::kBytes;
    Tile<D, KBITS, VBITS> tile;
    tile.read(stage, gid, tig);
    const float* k_norm = reinterpret_cast<const float*>(stage + S::kKeyNorm);
    const float* v_norm = reinterpret_cast<const float*>(stage + S::kValueNorm);
    const int t0 = start + kTile * i;
    const bool in_table = (listed >> (i & 31)) & 1u;
    const bool live0 = in_table && t0 + gid < end, live1 = in_table && t0 + gid + 8 < end;

    float s[4] = {0.f, 0.f, 0.f, 0.f};  // (tok gid: heads 2tig, 2tig+1), (tok gid+8: same)
    key_scores(tile, kcb, qb, s);
    const float kn0 = k_norm[gid], kn1 = k_norm[gid + 8];
    s[0] = live0 ? s[0] * kn0 : -INFINITY;
    s[1] = live0 ? s[1] * kn0 : -INFINITY;
    s[2] = live1 ? s[2] * kn1 : -INFINITY;
    s[3] = live1 ? s[3] * kn1 : -INFINITY;
    float p[4], alpha[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float m_new = fmaxf(m[c], group_max(fmaxf(s[c], s[c + 2])));
      alpha[c] = fast_exp2(m[c] - m_new);  // exactly 1 while the max stands
      p[c] = fast_exp2(s[c] - m_new);
      p[c + 2] = fast_exp2(s[c + 2] - m_new);
      l[c] = l[c] * alpha[c] + p[c] + p[c + 2];
      m[c] = m_new;
    }
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int mt = 0; mt < L::kSteps; ++mt) {
        acc[mt][0] *= alpha[0];
        acc[mt][1] *= alpha[1];
        acc[mt][2] *= alpha[0];
        acc[mt][3] *= alpha[1];
      }
    }
    const float vn0 = live0 ? v_norm[gid] : 0.f, vn1 = live1 ? v_norm[gid + 8] : 0.f;
    const uint32_t p0 = transpose_8x8(half2_bits(p[0] * vn0, p[1] * vn0));
    const uint32_t p1 = transpose_8x8(half2_bits(p[2] * vn1, p[3] * vn1));
    accumulate_values(tile, vcb, p0, p1, acc);
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  wait_copies<0>();
  l[0] = group_sum(l[0]);
  l[1] = group_sum(l[1]);

  if (!cta_merge) {
    const int64_t part = static_cast<int64_t>(pair) * a.num_splits + split;
    store_partial<D, KBITS, VBITS>(a, part, m, l, acc, gid, tig, a.part_m, a.part_l, a.part_acc + part * a.group * D);
    return;
  }
  // Each warp's (m, l, acc) into shared memory (over the rings), then the CTA merges its splits:
  // M = max_w m_w, L = sum_w l_w 2^(m_w - M), acc = sum_w acc_w 2^(m_w - M).
  __syncthreads();
  float* scratch = reinterpret_cast<float*>(split_smem) + a.table_bytes / 4;  // [warps][group][D + 2]
  const int row = D + 2;
  float* mine = scratch + warp * a.group * row;
  store_partial<D, KBITS, VBITS>(a, 0, m, l, acc, gid, tig, mine + D, mine + D + 1, mine, row);
  __syncthreads();
  const int64_t part = static_cast<int64_t>(pair) * (a.num_splits / L::kWarps) + split / L::kWarps;
  for (int e = threadIdx.x; e < a.group * D; e += blockDim.x) {
    const int head = e / D, d = e % D;
    float big = kNoScore;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) big = fmaxf(big, scratch[(w * a.group + head) * row + D]);
    float total = 0.f, sum = 0.f;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) {
      const float* r = scratch + (w * a.group + head) * row;
      const float f = fast_exp2(r[D] - big);
      total += f * r[D + 1];
      sum += f * r[d];
    }
    a.part_acc[(part * a.group + head) * D + d] = sum;
    if (d == 0) {
      a.part_m[part * a.group + head] = big;
      a.part_l[part * a.group + head] = total;
    }
  }
}

// q_rot[r, j] = scale * sum_i Pi[j, i] q[r, i] for 8 rows per CTA; thread j streams row j of Pi with
// 16-byte loads, 8 in flight.
constexpr int kRotateRows = 8;
template <typename T, int D>
__global__ void __launch_bounds__(D) rotate_query_kernel(const T* __restrict__ query, const float* __restrict__ rotation,
                                                         int rows, float scale, float* __restrict__ q_rot) {
  __shared__ float q[kRotateRows][D];
  const int r0 = blockIdx.x * kRotateRows, j = threadIdx.x;
#pragma unroll
  for (int r = 0; r < kRotateRows; ++r)
    q[r][j] = r0 + r < rows ? to_float(query[static_cast<int64_t>(r0 + r) * D + j]) : 0.f;
  __syncthreads();
  float y[kRotateRows] = {};
  const float4* row = reinterpret_cast<const float4*>(rotation + static_cast<int64_t>(j) * D);
#pragma unroll 8
  for (int i4 = 0; i4 < D / 4; ++i4) {
    const float4 p = __ldg(row + i4);
#pragma unroll
    for (int r = 0; r < kRotateRows; ++r)
      y[r] = fmaf(p.x, q[r][4 * i4], fmaf(p.y, q[r][4 * i4 + 1], fmaf(p.z, q[r][4 * i4 + 2], fmaf(p.w, q[r][4 * i4 + 3], y[r]))));
  }
#pragma unroll
  for (int r = 0; r < kRotateRows; ++r)
    if (r0 + r < rows) q_rot[static_cast<int64_t>(r0 + r) * D + j] = y[r] * scale;
}

// One output row (sequence, query head): M = max m_s, w_s = 2^(m_s - M), L = sum w_s l_s,
// a = sum w_s acc_s / L, out = Pi^T a. 8 warps share the splits; lanes take 4 coordinates each.
constexpr int kMergeThreads = 256;
template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) merge_rotate_kernel(const float* __restrict__ part_m,
                                                                     const float* __restrict__ part_l,
                                                                     const float* __restrict__ part_acc,
                                                                     const float* __restrict__ rotation, int group,
                                                                     int splits, T* __restrict__ out) {
  constexpr int dim = D;
  __shared__ float weight[kMaxSplits];
  __shared__ float partial[kMergeThreads / 32][256];
  __shared__ float merged[256];
  __shared__ float scratch[kMergeThreads / 32];
  const int row = blockIdx.x, pair = row / group, head = row % group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first = static_cast<int64_t>(pair) * splits;

  float big = kNoScore;
  for (int sp = threadIdx.x; sp < splits; sp += blockDim.x) big = fmaxf(big, part_m[(first + sp) * group + head]);
  for (int o = 16; o > 0; o >>= 1) big = fmaxf(big, __shfl_xor_sync(0xffffffffu, big, o));
  if (lane == 0) scratch[warp] = big;
  __syncthreads();
  big = scratch[0];
  for (int w = 1; w < kMergeThreads / 32; ++w) big = fmaxf(big, scratch[w]);
  __syncthreads();

  float total = 0.f;
  for (int sp = threadIdx.x; sp < splits; sp += blockDim.x) {
    const int64_t idx = (first + sp) * group + head;
    const float w = exp2f(part_m[idx] - big);
    weight[sp] = w;
    total += w * part_l[idx];
  }
  total = warp_sum(total);
  if (lane == 0) scratch[warp] = total;
  __syncthreads();
  total = 0.f;
  for (int w = 0; w < kMergeThreads / 32; ++w) total += scratch[w];

  for (int d0 = 4 * lane; d0 < dim; d0 += 128) {
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int sp = warp; sp < splits; sp += kMergeThreads / 32) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(part_acc + ((first + sp) * group + head) * dim + d0));
      const float w = weight[sp];
      sum.x = fmaf(w, v.x, sum.x);
      sum.y = fmaf(w, v.y, sum.y);
      sum.z = fmaf(w, v.z, sum.z);
      sum.w = fmaf(w, v.w, sum.w);
    }
    partial[warp][d0] = sum.x;
    partial[warp][d0 + 1] = sum.y;
    partial[warp][d0 + 2] = sum.z;
    partial[warp][d0 + 3] = sum.w;
  }
  __syncthreads();
  const float inv = total > 0.f ? 1.f / total : 0.f;  // an empty context gives zeros
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < kMergeThreads / 32; ++w) s += partial[w][d];
    merged[d] = s * inv;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float y = 0.f;
#pragma unroll 16
    for (int i = 0; i < dim; ++i) y = fmaf(merged[i], __ldg(rotation + i * dim + j), y);
    out[static_cast<int64_t>(row) * dim + j] = from_float<T>(y);
  }
}

int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 132;
  return sms;
}

struct Plan {
  int splits, tokens_per_split, warps_per_cta, merged_splits;
  size_t q_rot_offset, m_offset, l_offset, acc_offset, bytes;
};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

Plan make_plan(int64_t num_seqs, int64_t hq, int64_t hkv, int64_t dim, int64_t max_blocks, int64_t block_size,
               int64_t tokens_per_split) {
  const int64_t pairs = num_seqs * hkv, group = hq / hkv;
  const int64_t tiles = std::max<int64_t>(1, (max_blocks * block_size + kTile - 1) / kTile);
  int64_t tiles_per_split;
  if (tokens_per_split > 0) {
    tiles_per_split = (tokens_per_split + kTile - 1) / kTile;
  } else {
    const int64_t want = std::max<int64_t>(1, static_cast<int64_t>(num_sms()) * kTargetWarpsPerSm / std::max<int64_t>(pairs, 1));
    tiles_per_split = (tiles + std::min(want, tiles) - 1) / std::min(want, tiles);
  }
  tiles_per_split = std::max(tiles_per_split, (tiles + kMaxSplits - 1) / kMaxSplits);
  Plan p;
  p.splits = static_cast<int>((tiles + tiles_per_split - 1) / tiles_per_split);
  p.tokens_per_split = static_cast<int>(tiles_per_split * kTile);
  // many splits: round up to whole CTAs of one pair (the split kernel then merges per CTA, and the
  // trailing splits of a sequence are empty)
  p.warps_per_cta = dim <= 128 ? 16 : 8;
  if (p.splits >= p.warps_per_cta) p.splits = (p.splits + p.warps_per_cta - 1) / p.warps_per_cta * p.warps_per_cta;
  p.merged_splits = p.splits % p.warps_per_cta == 0 ? p.splits / p.warps_per_cta : p.splits;
  const size_t parts = static_cast<size_t>(pairs) * p.splits * group;
  p.q_rot_offset = 0;
  p.m_offset = align256(static_cast<size_t>(num_seqs * hq * dim) * sizeof(float));
  p.l_offset = p.m_offset + align256(parts * sizeof(float));
  p.acc_offset = p.l_offset + align256(parts * sizeof(float));
  p.bytes = p.acc_offset + align256(parts * dim * sizeof(float));
  return p;
}

template <int D, int KBITS, int VBITS>
int launch_split(SplitArgs args, cudaStream_t stream) {
  using L = Layout<D, KBITS, VBITS>;
  const int tables = (KBITS == 4) + (VBITS == 4 && !(KBITS == 4 && args.shared_codebook));
  args.table_bytes = tables * kPairTableWords * 4;
  const int warps = args.num_pairs * args.num_splits;
  const size_t rings = static_cast<size_t>(L::kWarps) * L::kStages * Stage<D, KBITS, VBITS>::kBytes;
  const size_t merge_scratch = static_cast<size_t>(L::kWarps) * args.group * (D + 2) * sizeof(float);
  const size_t shared = args.table_bytes + std::max(rings, merge_scratch);
  if (int rc = reserve_shared(split_kernel<D, KBITS, VBITS>, shared)) return rc;
  split_kernel<D, KBITS, VBITS><<<(warps + L::kWarps - 1) / L::kWarps, L::kWarps * 32, shared, stream>>>(args);
  return 0;
}

template <int D>
int launch_split_bits(const SplitArgs& args, int k_bits, int v_bits, cudaStream_t stream) {
  if (k_bits == 4 && v_bits == 4) return launch_split<D, 4, 4>(args, stream);
  if (k_bits == 4 && v_bits == 2) return launch_split<D, 4, 2>(args, stream);
  if (k_bits == 2 && v_bits == 4) return launch_split<D, 2, 4>(args, stream);
  if (k_bits == 2 && v_bits == 2) return launch_split<D, 2, 2>(args, stream);
  return TQ_CUDA_BAD_ARGUMENT;
}

// f(std::integral_constant<int, D>) for the supported head dimensions (callers checked supported()).
template <typename F>
void dispatch_dim(int dim, F&& f) {
  if (dim == 64) f(std::integral_constant<int, 64>{});
  else if (dim == 128) f(std::integral_constant<int, 128>{});
  else if (dim == 256) f(std::integral_constant<int, 256>{});
}

bool supported(int64_t hq, int64_t hkv, int64_t dim, int64_t block_size, int k_bits, int v_bits) {
  return hkv >= 1 && hq >= hkv && hq % hkv == 0 && hq / hkv <= kMaxGroup && (dim == 64 || dim == 128 || dim == 256) &&
         block_size >= kTile && block_size % kTile == 0 && (k_bits == 2 || k_bits == 4) && (v_bits == 2 || v_bits == 4);
}

}  // namespace
}  // namespace mma
}  // namespace tq_cuda

using namespace tq_cuda;

extern "C" int tq_cuda_paged_attention_mma_supported(int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                                     int64_t block_size, int k_bits, int v_bits) {
  return mma::supported(num_q_heads, num_kv_heads, head_dim, block_size, k_bits, v_bits) ? 1 : 0;
}

extern "C" size_t tq_cuda_paged_attention_mma_workspace(int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                                                        int64_t head_dim, int64_t max_blocks, int64_t block_size,
                                                        int64_t tokens_per_split) {
  if (num_seqs < 1 || num_kv_heads < 1 || num_q_heads % num_kv_heads != 0 || max_blocks < 0 || block_size < 1) return 0;
  return mma::make_plan(num_seqs, num_q_heads, num_kv_heads, head_dim, max_blocks, block_size, tokens_per_split).bytes;
}

extern "C" int tq_cuda_paged_attention_mma(const void* query, tq_cuda_dtype q_type, int64_t num_seqs,
                                           int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                           const uint8_t* k_codes, const float* k_norms, const uint8_t* v_codes,
                                           const float* v_norms, int64_t num_blocks, int64_t block_size,
                                           const int32_t* block_tables, int64_t max_blocks,
                                           const int32_t* context_lens, const float* rotation,
                                           const float* k_codebook, const float* v_codebook, int k_bits, int v_bits,
                                           float scale, int64_t tokens_per_split, void* workspace,
                                           size_t workspace_bytes, void* out, cudaStream_t stream) {
  if (!mma::supported(num_q_heads, num_kv_heads, head_dim, block_size, k_bits, v_bits) || num_seqs < 0 ||
      num_seqs * num_kv_heads > (int64_t{1} << 24) || num_blocks < 0 || num_blocks > (int64_t{1} << 31) - 1 ||
      max_blocks < 0 || max_blocks * block_size > (int64_t{1} << 30) || tokens_per_split < 0)
    return TQ_CUDA_BAD_ARGUMENT;
  if (num_seqs == 0) return 0;
  const mma::Plan plan = mma::make_plan(num_seqs, num_q_heads, num_kv_heads, head_dim, max_blocks, block_size,
                                        tokens_per_split);
  if (workspace == nullptr || workspace_bytes < plan.bytes) return TQ_CUDA_BAD_ARGUMENT;
  // whole rows move with 16-byte cp.async (rows are multiples of 16 bytes for supported shapes)
  if (reinterpret_cast<uintptr_t>(k_codes) % 16 || reinterpret_cast<uintptr_t>(v_codes) % 16) return TQ_CUDA_BAD_ARGUMENT;
  if (!(scale > 0.f)) scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  char* ws = static_cast<char*>(workspace);
  float* q_rot = reinterpret_cast<float*>(ws + plan.q_rot_offset);
  const int rows = static_cast<int>(num_seqs * num_q_heads), dim = static_cast<int>(head_dim);
  const unsigned rotate_ctas = static_cast<unsigned>((rows + mma::kRotateRows - 1) / mma::kRotateRows);
  const float q_scale = scale * mma::kLog2e;
  if (q_type != TQ_CUDA_FLOAT16 && q_type != TQ_CUDA_FLOAT32) return TQ_CUDA_BAD_ARGUMENT;
  mma::dispatch_dim(dim, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if (q_type == TQ_CUDA_FLOAT16)
      mma::rotate_query_kernel<__half, D><<<rotate_ctas, D, 0, stream>>>(static_cast<const __half*>(query), rotation,
                                                                         rows, q_scale, q_rot);
    else
      mma::rotate_query_kernel<float, D><<<rotate_ctas, D, 0, stream>>>(static_cast<const float*>(query), rotation,
                                                                        rows, q_scale, q_rot);
  });

  mma::SplitArgs args;
  args.q_rot = q_rot;
  args.k_codes = k_codes;
  args.k_norms = k_norms;
  args.v_codes = v_codes;
  args.v_norms = v_norms;
  args.block_tables = block_tables;
  args.context_lens = context_lens;
  args.k_codebook = k_codebook;
  args.v_codebook = v_codebook;
  args.num_pairs = static_cast<int>(num_seqs * num_kv_heads);
  args.num_kv_heads = static_cast<int>(num_kv_heads);
  args.group = static_cast<int>(num_q_heads / num_kv_heads);
  args.block_size = static_cast<int>(block_size);
  args.max_blocks = static_cast<int>(max_blocks);
  args.num_blocks = static_cast<int>(num_blocks);
  args.tokens_per_split = plan.tokens_per_split;
  args.num_splits = plan.splits;
  args.shared_codebook = k_codebook == v_codebook;
  args.part_m = reinterpret_cast<float*>(ws + plan.m_offset);
  args.part_l = reinterpret_cast<float*>(ws + plan.l_offset);
  args.part_acc = reinterpret_cast<float*>(ws + plan.acc_offset);
  int rc = TQ_CUDA_BAD_ARGUMENT;
  mma::dispatch_dim(dim, [&](auto d) { rc = mma::launch_split_bits<decltype(d)::value>(args, k_bits, v_bits, stream); });
  if (rc) return rc;

  mma::dispatch_dim(dim, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if (q_type == TQ_CUDA_FLOAT16)
      mma::merge_rotate_kernel<__half, D><<<rows, mma::kMergeThreads, 0, stream>>>(
          args.part_m, args.part_l, args.part_acc, rotation, args.group, plan.merged_splits, static_cast<__half*>(out));
    else
      mma::merge_rotate_kernel<float, D><<<rows, mma::kMergeThreads, 0, stream>>>(
          args.part_m, args.part_l, args.part_acc, rotation, args.group, plan.merged_splits, static_cast<float*>(out));
  });
  return launch_status();
}
