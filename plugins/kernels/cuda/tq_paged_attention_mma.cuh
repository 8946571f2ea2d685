// TQPagedAttention on the tensor cores (flash-decoding in the rotated domain), one launch:
//
//   grid (unit = (sequence, KV head, chunk of <= 8 of its query heads), CTA c of the unit's ctas);
//   kWarps warps per CTA, warp w runs split c * kWarps + w, a run of tiles_per_warp 16-token tiles
//   of the context. A tile is 16 rows of one cache block when the block size is a multiple of 16;
//   for any other block size each lane looks up the block of every row it copies.
//   prologue   each warp starts its cp.async ring (the first tiles' packed bytes), then the CTA
//              fills the dequantization tables and rotates the query heads of its unit:
//              q_rot = Pi q * scale * log2(e), each head scaled by a power of two into fp16 range
//   loop       per tile:  S^T[16 tok x 8 heads] = K[16 tok x D] . q_rot^T      (K is the A operand)
//                         online softmax (base 2) per head; P' = P * ||v|| / sigma
//                         O^T[D x 8 heads] += V^T[D x 16 tok] . P'^T            (V^T is the A operand)
//              sigma is the warp's running largest value norm, so that P' stays within fp16.
//              K and V come straight from the packed cache into A fragments through shared-memory
//              tables (one copy per lane: conflict-free): pairs of codes for up to 4 bits (an entry
//              per 2b-bit field), single codes for 5 to 8 bits.
//   merge      the CTA merges its warps' (max, sum, acc) in shared memory; with one CTA per unit it
//              rotates back (out = Pi^T acc / sum) itself, else the unit's last CTA to finish
//              (an atomic counter) merges the CTAs' partials and rotates back.
//
// Permutations that make each lane's bytes contiguous: a lane (gid, tig) holds, for its two key
// rows, the quarter tig of the row's packed stream (coordinates tig*D/4 ...), consecutive codes
// pairing into the fp16 pairs of its A fragments; the query's B fragments follow the same order.
// For V^T it holds the eighth gid of each value row (coordinates gid*D/8 ...), code 2mt + hi of
// that run in m-tile mt, row gid + 8 hi; the output is un-permuted when the accumulator is stored.
//
// Head dims other than 64/128/256 take the raw path (kRaw): the 8-bit instance of the dim padded to
// a multiple of 16, fed packed rows of any width (issue_raw, widen_codes below).
//
// float16 cache norms (norm_dtype): cp.async copies the aligned word that holds each (copy_norm), the
// stage's live-token word notes which half it is, and once the tile has landed each lane rewrites
// the slot it copied as float32 (widen_norm): the loop reads float32 norms either way.
//
// The key mean (kMean, key_mean and rope_inv_freq given; D 64/128/256): a token at position
// t = t0 + i of a tile (t >= 1) scores sum_f A_f cos(t w_f) + B_f sin(t w_f) more, (A, B) the
// head's coefficients of q and mu (docs/ops.md). Turning (A, B) by t0 w_f once per tile leaves
// sum_f A'_f cos(i w_f) + B'_f sin(i w_f): one more mma per k-step, of a fixed [16 x D] table of
// cos(i w_f), sin(i w_f) (A operand, in shared memory) and the turned coefficients (B operand).
// Only the D/2 angles t0 w_f need a sine and cosine per tile: one to four per lane, shuffled to the
// lanes that hold them.
#include <math.h>

#include <algorithm>
#include <type_traits>

#pragma once

#include "tq_cuda_common.cuh"
#include "tq_mma.cuh"
#include "tq_paged_attention_plan.h"

namespace tq_cuda {
namespace mma {

constexpr int kTile = 16;         // tokens per step
constexpr int kMaxGroup = 8;      // the mma's N: query heads per CTA
constexpr int kSharedLimit = 227 * 1024;

__host__ __device__ constexpr int lowest_bit(int n) { return n & -n; }
__host__ __device__ constexpr int min_int(int a, int b) { return a < b ? a : b; }

// How a lane turns b-bit codes into fp16 pairs: an entry per 2b-bit field (two codes) for b <= 4,
// an entry per code for wider codes (then two lookups and a byte permute make a pair). Entry e of
// lane l sits at word 32 e + l, so the 32 lanes' lookups always fall in 32 different banks.
template <int B>
struct Table {
  static constexpr bool kPairs = B <= 4;
  static constexpr int kEntries = kPairs ? 1 << (2 * B) : 1 << B;
  static constexpr int kBytes = kEntries * 32 * 4;
  uint32_t lane_base;  // shared-window address of this lane's entry 0

  __device__ __forceinline__ uint32_t operator()(uint32_t entry) const {
    // not volatile: the table is constant once filled, so the compiler may schedule these freely
    uint32_t v;
    asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(entry * 128u + lane_base));
    return v;
  }
  // Cooperative fill by the whole CTA (the caller synchronizes before use): a pair entry holds
  // (c[e & mask], c[e >> B]), a single entry (c[e & codes], c[e & codes]); `codes` = 2^bits - 1
  // of a narrower codebook (the raw path's 8-bit table).
  __device__ static void fill(uint32_t* table, const float* codebook, int codes = (1 << B) - 1) {
    constexpr int mask = (1 << B) - 1;
    for (int w = threadIdx.x; w < kEntries * 32; w += blockDim.x) {
      const int e = w >> 5;
      const float lo = __ldg(codebook + (e & (kPairs ? mask : codes))), hi = kPairs ? __ldg(codebook + (e >> B)) : lo;
      table[w] = half2_bits(lo, hi);
    }
  }
};

template <int D, int KB, int VB, bool kMean = false>
struct Layout {
  static constexpr int kWarps = D <= 128 ? 16 : 8;      // per CTA (one CTA per SM)
  static constexpr int kKeyRow = D * KB / 8;            // packed bytes of a key row
  static constexpr int kValueRow = D * VB / 8;
  static constexpr int kKeyRun = kKeyRow / 4;           // a lane's quarter of a key row
  static constexpr int kValueRun = kValueRow / 8;       // a lane's eighth of a value row
  static constexpr int kKeyWords = (kKeyRun + 3) / 4;
  static constexpr int kValueWords = (kValueRun + 3) / 4;
  static constexpr int kKeyChunk = min_int(16, lowest_bit(kKeyRow));    // cp.async bytes
  static constexpr int kValueChunk = min_int(16, lowest_bit(kValueRow));
  // + key and value norms, the tile's live tokens (a word, padded to 16 bytes)
  static constexpr int kStage = kTile * (kKeyRow + kValueRow) + 2 * kTile * 4 + 16;
  static constexpr bool kShareTable = KB == VB;          // one table when the codebooks are one too
  static constexpr int kTables = Table<KB>::kBytes + Table<VB>::kBytes;
  // q_rot fp32 [8][D] (in the loop the key mean's coefficients, after it the merged accumulator),
  // then per head: query scale, merged max and sum, 1 / sum; with the key mean its cos/sin table
  // (A fragments of the D/16 k-steps) and per head the coefficients' scale
  static constexpr int kQueryHeads = (kMaxGroup * D + 4 * kMaxGroup) * 4;
  static constexpr int kMeanTable = kMean ? (D / 16) * 4 * 32 * 4 : 0;
  static constexpr int kQuery = kQueryHeads + kMeanTable + (kMean ? kMaxGroup * 4 : 0);
  static constexpr int kStages = min_int(4, (kSharedLimit - kTables - kQuery) / (kWarps * kStage));
  static constexpr int kRing = kWarps * kStages * kStage;
  static constexpr int kMergeScratch = kWarps * kMaxGroup * (D + 2) * 4;
  static constexpr int kShared = kTables + kQuery + (kRing > kMergeScratch ? kRing : kMergeScratch);
  static_assert(kKeyRun >= 2 && kValueRun >= 1, "D * bits too small for the fragment layout");
  static_assert(kKeyChunk >= 4 && kValueChunk >= 4, "packed rows must be whole 4-byte words");
  static_assert(kStages >= 2, "not enough shared memory for a two-stage ring");
  static_assert(kShared <= kSharedLimit, "shared memory");
};

// One tile as it sits in a warp's stage: key rows in token order, value rows in the order
// tig + 4r for token 2tig + (r & 1) + 8 (r >> 1) (the 8 lanes of one r then read 4 contiguous
// rows: no bank conflicts), then the 16 key norms, the 16 value norms (4-byte slots: copy_norm)
// and a word of live-token bits.
template <int D, int KB, int VB>
struct Stage {
  using L = Layout<D, KB, VB>;
  static constexpr int kKey = 0;
  static constexpr int kValue = kTile * L::kKeyRow;
  static constexpr int kKeyNorm = kValue + kTile * L::kValueRow;
  static constexpr int kValueNorm = kKeyNorm + kTile * 4;
  // bit t: token t counts (in the table and context); float16 norms: bit 16 + t, token t's norms are
  // their slots' upper halves (copy_norm); the raw path's row offsets at +8 and +12
  static constexpr int kLive = kValueNorm + kTile * 4;
  __device__ static constexpr int value_row(int token) { return (token & 8) | ((token & 1) << 2) | ((token >> 1) & 3); }
};

// n / d for 0 <= n < 2^31 by a multiply-high (d >= 1 fixed for the launch).
struct FastDiv {
  uint32_t magic, shift;
  __host__ static FastDiv of(uint32_t d) {
    uint32_t shift = 0;
    while ((uint64_t{1} << shift) < d) ++shift;
    const uint64_t magic = ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1;
    return {static_cast<uint32_t>(magic), shift};
  }
  __device__ __forceinline__ int operator()(int n) const {
    return static_cast<int>((__umulhi(static_cast<uint32_t>(n), magic) + static_cast<uint32_t>(n)) >> shift);
  }
};

// Where token `token` of a sequence sits (block-table entry -> row of KV head h), or -1 when it is
// past `end` or its entry is outside [0, num_blocks).
struct RowFinder {
  const int32_t* table;  // the sequence's block-table row
  FastDiv per_block;
  int block_size, num_blocks, kv_heads, head, end;
  __device__ __forceinline__ int64_t operator()(int token) const {
    if (token >= end) return -1;
    const int entry = per_block(token);
    const int block = __ldg(table + entry);
    if (block < 0 || block >= num_blocks) return -1;
    return (static_cast<int64_t>(block) * block_size + (token - entry * block_size)) * kv_heads + head;
  }
  // rows of the cache (N * B * Hkv): the length of its norm arrays
  __device__ __forceinline__ int64_t cells() const {
    return static_cast<int64_t>(num_blocks) * block_size * kv_heads;
  }
};

// Norm i of a cache's `count` norms into the 4-byte stage slot `dst` by cp.async, like the codes.
// A float32 norm is the slot. cp.async copies no fewer than 4 bytes, so a float16 norm comes with
// the aligned word that holds it (the tensor-core plan takes 4-byte aligned norms only): norms
// i-1 and i for odd i (norm i its upper half), i and i+1 for even i. The array's last norm at an
// even index has no such word inside the array: it is loaded and stored as it is (memcheck holds a
// cp.async of a 2-byte source to its 4 bytes). Returns whether the norm is its slot's upper half
// (widen_norm).
__device__ __forceinline__ bool copy_norm(uint32_t dst, const void* norms, int64_t i, int64_t count, bool half) {
  if (!half) {
    copy_async_4(dst, static_cast<const float*>(norms) + i);
    return false;
  }
  if ((i & 1) || i + 1 < count) {
    copy_async_4(dst, static_cast<const uint32_t*>(norms) + (i >> 1));
    return i & 1;
  }
  const uint32_t bits = __ldg(static_cast<const unsigned short*>(norms) + i);
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(dst), "r"(bits) : "memory");
  return false;
}

// A landed float16 norm's slot rewritten as the float32 norm (the loop reads float32 slots): the
// float16 in the slot's upper half where upper & 1, else in its lower half.
__device__ __forceinline__ void widen_norm(uint8_t* slot, uint32_t upper) {
  const uint32_t word = *reinterpret_cast<const uint32_t*>(slot);
  const unsigned short bits = static_cast<unsigned short>(upper & 1u ? word >> 16 : word);
  *reinterpret_cast<float*>(slot) = __half2float(__ushort_as_half(bits));
}

// A lane's part in copying a tile into a stage: which chunks of which rows (offsets from the
// tile's first cell, fixed for the whole loop) and one norm (lanes 0-15 key norms, 16-31 value).
template <int D, int KB, int VB>
struct TileCopy {
  using L = Layout<D, KB, VB>;
  using S = Stage<D, KB, VB>;
  static constexpr int kKeyChunks = kTile * L::kKeyRow / L::kKeyChunk;
  static constexpr int kValueChunks = kTile * L::kValueRow / L::kValueChunk;
  static constexpr int kKeyPerLane = (kKeyChunks + 31) / 32, kValuePerLane = (kValueChunks + 31) / 32;
  int64_t key_src[kKeyPerLane], value_src[kValuePerLane], norm_src;
  uint32_t key_dst[kKeyPerLane], value_dst[kValuePerLane], norm_dst;
  bool key_lane[kKeyPerLane], value_lane[kValuePerLane], key_norm;

  __device__ __forceinline__ TileCopy(int lane, int64_t kv_heads) {
    constexpr int kPerKeyRow = L::kKeyRow / L::kKeyChunk, kPerValueRow = L::kValueRow / L::kValueChunk;
#pragma unroll
    for (int i = 0; i < kKeyPerLane; ++i) {
      const int c = lane + 32 * i, t = c / kPerKeyRow, part = c % kPerKeyRow;
      key_lane[i] = c < kKeyChunks;
      key_src[i] = t * kv_heads * L::kKeyRow + part * L::kKeyChunk;
      key_dst[i] = S::kKey + t * L::kKeyRow + part * L::kKeyChunk;
    }
#pragma unroll
    for (int i = 0; i < kValuePerLane; ++i) {
      const int c = lane + 32 * i, t = c / kPerValueRow, part = c % kPerValueRow;
      value_lane[i] = c < kValueChunks;
      value_src[i] = t * kv_heads * L::kValueRow + part * L::kValueChunk;
      value_dst[i] = S::kValue + S::value_row(t) * L::kValueRow + part * L::kValueChunk;
    }
    key_norm = lane < 16;
    norm_src = (lane & 15) * kv_heads;
    norm_dst = (key_norm ? S::kKeyNorm : S::kValueNorm) + 4 * (lane & 15);
  }

  // Any block size: the whole warp copies tokens t0 .. t0 + 15, each row from its own block (rows
  // that are not live are not copied: their stale stage bytes decode to finite values that the
  // softmax masks). Returns the tile's live tokens, bit t for token t0 + t.
  __device__ __forceinline__ uint32_t issue_rows(const uint8_t* k_codes, const void* k_norms, const uint8_t* v_codes,
                                                 const void* v_norms, bool half, bool& upper, const RowFinder& rows,
                                                 int t0, uint32_t stage) const {
    constexpr int kPerKeyRow = L::kKeyRow / L::kKeyChunk, kPerValueRow = L::kValueRow / L::kValueChunk;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < kKeyPerLane; ++i) {
      const int c = lane + 32 * i, t = c / kPerKeyRow, part = c % kPerKeyRow;
      const int64_t row = key_lane[i] ? rows(t0 + t) : -1;
      if (row >= 0) copy_async<L::kKeyChunk>(stage + key_dst[i], k_codes + row * L::kKeyRow + part * L::kKeyChunk);
    }
#pragma unroll
    for (int i = 0; i < kValuePerLane; ++i) {
      const int c = lane + 32 * i, t = c / kPerValueRow, part = c % kPerValueRow;
      const int64_t row = value_lane[i] ? rows(t0 + t) : -1;
      if (row >= 0)
        copy_async<L::kValueChunk>(stage + value_dst[i], v_codes + row * L::kValueRow + part * L::kValueChunk);
    }
    const int64_t row = rows(t0 + (lane & 15));
    if (row >= 0) upper = copy_norm(stage + norm_dst, key_norm ? k_norms : v_norms, row, rows.cells(), half);
    return __ballot_sync(0xffffffffu, row >= 0) & 0xffffu;
  }

  // The whole warp copies the 16 tokens starting at cache cell `first` (of a KV head) into `stage`.
  __device__ __forceinline__ void issue(const uint8_t* k_codes, const void* k_norms, const uint8_t* v_codes,
                                        const void* v_norms, bool half, bool& upper, int64_t first,
                                        uint32_t stage) const {
    const uint8_t* k = k_codes + first * L::kKeyRow;
    const uint8_t* v = v_codes + first * L::kValueRow;
#pragma unroll
    for (int i = 0; i < kKeyPerLane; ++i)
      if (key_lane[i]) copy_async<L::kKeyChunk>(stage + key_dst[i], k + key_src[i]);
#pragma unroll
    for (int i = 0; i < kValuePerLane; ++i)
      if (value_lane[i]) copy_async<L::kValueChunk>(stage + value_dst[i], v + value_src[i]);
    // whole tiles: B is a multiple of 16, so the norms' count N * B * Hkv is even and every even
    // index has its pair
    upper = copy_norm(stage + norm_dst, key_norm ? k_norms : v_norms, first + norm_src, INT64_MAX, half);
  }
};

// BYTES bytes from shared memory into words (the last one zero-padded), with the widest loads the
// address alignment (the lowest set bit of BYTES) allows.
template <int BYTES>
__device__ __forceinline__ void load_run(const uint8_t* p, uint32_t* w) {
  constexpr int kAlign = min_int(16, lowest_bit(BYTES));
  if constexpr (kAlign == 16) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  } else if constexpr (kAlign == 8) {
#pragma unroll
    for (int i = 0; i < BYTES / 8; ++i) {
      const uint2 v = reinterpret_cast<const uint2*>(p)[i];
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else if constexpr (kAlign == 4) {
#pragma unroll
    for (int i = 0; i < BYTES / 4; ++i) w[i] = reinterpret_cast<const uint32_t*>(p)[i];
  } else {
#pragma unroll
    for (int i = 0; i < (BYTES + 3) / 4; ++i) w[i] = 0;
#pragma unroll
    for (int i = 0; i < BYTES / kAlign; ++i) {
      const uint32_t v = kAlign == 2 ? reinterpret_cast<const unsigned short*>(p)[i] : p[i];
      w[(i * kAlign) / 4] |= v << (8 * ((i * kAlign) % 4));
    }
  }
}

// N codes of `bits` bits from bit `first` of a staged row, one per byte into out[0 .. ceil(N/4))
// (and a zero pad word); a last partial word takes the codes that follow too. Four codes (at most
// 32 bits) come out of one funnel-shifted window. Codes past
// the true head dim decode whatever bits follow: finite table values that meet zeros in the query
// (keys) or land in output coordinates that are never read (values).
template <int N>
__device__ __forceinline__ void widen_codes(const uint8_t* row, int first, int bits, uint32_t* out) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(row);
  const uint32_t mask = (1u << bits) - 1u;
#pragma unroll
  for (int g = 0; g < (N + 3) / 4; ++g) {
    const int pos = first + 4 * g * bits;
    const uint32_t v = __funnelshift_r(w[pos >> 5], w[(pos >> 5) + 1], pos);  // shifts by pos & 31
    out[g] = (v & mask) | ((v >> bits) & mask) << 8 | ((v >> (2 * bits)) & mask) << 16 |
             ((v >> (3 * bits)) & mask) << 24;
  }
  out[(N + 3) / 4] = 0;
}

// A lane's share of one tile, read from its stage.
template <int D, int KB, int VB>
struct Tile {
  using L = Layout<D, KB, VB>;
  uint32_t k[2][L::kKeyWords + 1];    // rows gid, gid+8: the lane's quarter (+1: fields may read past)
  uint32_t v[4][L::kValueWords + 1];  // tokens 2tig, 2tig+1, 2tig+8, 2tig+9: the lane's eighth

  __device__ __forceinline__ void read(const uint8_t* stage, int gid, int tig) {
    using S = Stage<D, KB, VB>;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      load_run<L::kKeyRun>(stage + S::kKey + (gid + 8 * r) * L::kKeyRow + tig * L::kKeyRun, k[r]);
      k[r][L::kKeyWords] = 0;
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      load_run<L::kValueRun>(stage + S::kValue + (tig + 4 * r) * L::kValueRow + gid * L::kValueRun, v[r]);
      v[r][L::kValueWords] = 0;
    }
  }

  // The raw path (KB = VB = 8 layout): the same shares, widened from rows of the true widths,
  // keys and values apart (each just before its use: fewer live registers).
  // byte offset of token t's key (which 0) or value (which 1) row in its first word
  static __device__ __forceinline__ int raw_offset(const uint8_t* stage, int which, int t) {
    const uint32_t bits = *reinterpret_cast<const uint32_t*>(stage + Stage<D, KB, VB>::kLive + 8 + 4 * which);
    return static_cast<int>(((bits >> t) & 1u) | (((bits >> (16 + t)) & 1u) << 1));
  }
  __device__ __forceinline__ void read_raw_keys(const uint8_t* stage, int gid, int tig, int k_bits) {
    using S = Stage<D, KB, VB>;
    static_assert(KB == 8 && VB == 8, "the raw path widens to 8-bit codes");
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int t = gid + 8 * r, j0 = tig * (D / 4);
      widen_codes<D / 4>(stage + S::kKey + t * D, 8 * raw_offset(stage, 0, t) + j0 * k_bits, k_bits, k[r]);
    }
  }
  __device__ __forceinline__ void read_raw_values(const uint8_t* stage, int gid, int tig, int v_bits) {
    using S = Stage<D, KB, VB>;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int t = 2 * tig + (r & 1) + 8 * (r >> 1), j0 = gid * (D / 8);  // stage row tig + 4r
      widen_codes<D / 8>(stage + S::kValue + (tig + 4 * r) * D, 8 * raw_offset(stage, 1, t) + j0 * v_bits, v_bits,
                         v[r]);
    }
  }
};

// fp16 pair (code 2h, code 2h+1) of a run of B-bit codes.
template <int B>
__device__ __forceinline__ uint32_t code_pair(const uint32_t* run, int h, const Table<B>& table) {
  if constexpr (Table<B>::kPairs) {
    return table(stream_bits(run, 2 * h * B, 2 * B));
  } else {
    const uint32_t a = table(stream_bits(run, 2 * h * B, B)), b = table(stream_bits(run, (2 * h + 1) * B, B));
    return prmt(a, b, 0x5410u);
  }
}

// fp16 pair (code c of run x, code c of run y): one coordinate of two tokens.
template <int B>
__device__ __forceinline__ uint32_t token_pair(const uint32_t* x, const uint32_t* y, int c, const Table<B>& table) {
  if constexpr (Table<B>::kPairs) {
    return table(stream_bits(x, c * B, B) | (stream_bits(y, c * B, B) << B));
  } else {
    return prmt(table(stream_bits(x, c * B, B)), table(stream_bits(y, c * B, B)), 0x5410u);
  }
}

// S^T (tokens gid, gid+8 x heads 2tig, 2tig+1) of one tile: K rows from the cache, q^T from qb.
template <int D, int KB, int VB>
__device__ __forceinline__ void key_scores(const Tile<D, KB, VB>& tile, const Table<KB>& table,
                                           const uint32_t (&qb)[D / 16][2], float (&s)[4]) {
  float s2[4] = {0.f, 0.f, 0.f, 0.f};  // odd k-steps: two dependent mma chains of half the length
#pragma unroll
  for (int st = 0; st < D / 16; ++st) {
    const uint32_t frag[4] = {code_pair<KB>(tile.k[0], 2 * st, table), code_pair<KB>(tile.k[1], 2 * st, table),
                              code_pair<KB>(tile.k[0], 2 * st + 1, table), code_pair<KB>(tile.k[1], 2 * st + 1, table)};
    mma_16816(st & 1 ? s2 : s, frag, qb[st][0], qb[st][1]);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) s[e] += s2[e];
}

// acc (m-tiles of O^T) += V^T . P'^T for one tile; p0/p1 = P'^T B fragments (tokens 0-7 / 8-15).
template <int D, int KB, int VB>
__device__ __forceinline__ void accumulate_values(const Tile<D, KB, VB>& tile, const Table<VB>& table, uint32_t p0,
                                                  uint32_t p1, float (&acc)[D / 16][4]) {
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) {
    const uint32_t frag[4] = {token_pair<VB>(tile.v[0], tile.v[1], 2 * mt, table),
                              token_pair<VB>(tile.v[0], tile.v[1], 2 * mt + 1, table),
                              token_pair<VB>(tile.v[2], tile.v[3], 2 * mt, table),
                              token_pair<VB>(tile.v[2], tile.v[3], 2 * mt + 1, table)};
    mma_16816(acc[mt], frag, p0, p1);
  }
}

// sin and cos of x (a float32 angle t * w, up to 1e5 and more): x - 2 pi k with 2 pi in two parts,
// then the fast sincos on [-pi, pi], whose error is then 2^-21.
__device__ __forceinline__ void reduced_sincos(float x, float& s, float& c) {
  const float k = rintf(x * 0.159154943f);
  const float r = fmaf(-k, -1.74845553e-7f, fmaf(-k, 6.28318548f, x));
  __sincosf(r, &s, &c);
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

// The kernel's argument, filled from the call (tq_paged_attention_call) and its plan by run(). Not
// the call struct itself: that one's layout follows the contract (generated from ops.py), while
// this one's is the kernel's parameter layout, which ptxas allocates registers by (see below).
struct SplitArgs {
  const void* query;
  tq_cuda_dtype q_type;
  PagedCacheArgs cache;  // the byte offsets of the flat fields it replaced
  const float* rotation;
  const float* k_codebook;
  const float* v_codebook;
  float q_scale;  // softmax scale * log2(e)
  int num_kv_heads, num_q_heads, group, block_size, max_blocks, num_blocks;
  int chunks;       // chunks of query heads per KV head (ceil(group / 8))
  int chunk_heads;  // min(group, 8): the partials' stride
  FastDiv per_block;  // token -> block-table entry
  int tiles_per_warp, ctas_per_pair;
  int* counters;    // [units], zero at launch (ctas_per_pair > 1)
  float* part_ml;   // [units, ctas, chunk_heads, 2]
  float* part_acc;  // [units, ctas, chunk_heads, D]
  void* out;
  // raw path (head dims other than 64/128/256): the true head dim, widths, packed row bytes, the
  // 4-byte words copied per row. Last: fields ahead of the others changed the packed-path
  // instances' register allocation (spills at k6v4, k8v4).
  int dim, k_bits, v_bits, k_row, v_row, k_words, v_words;
  FastDiv per_k_words, per_v_words;
  const float* key_mean;       // [num_kv_heads, D] (the kMean instances)
  const float* rope_inv_freq;  // [D / 2]
  bool half_norms;             // the cache's norms are float16 (else float32): copy_norm
};

// out[row0 + h][j] = sum_i Pi[i][j] acc[h][i] * inv[h] for the CTA's heads, by the whole CTA.
// dim: the true head dim (D, or less on the raw path).
__device__ __forceinline__ void rotate_back(const SplitArgs& a, int64_t row0, int heads, int dim, const float* acc,
                                            int acc_stride, const float* inv) {
  for (int e = threadIdx.x; e < heads * dim; e += blockDim.x) {
    const int h = e / dim, j = e % dim;
    const float* r = acc + h * acc_stride;
    float y = 0.f;
#pragma unroll 8
    for (int i = 0; i < dim; ++i) y = fmaf(r[i], __ldg(a.rotation + i * dim + j), y);
    y *= inv[h];
    const int64_t o = (row0 + h) * dim + j;
    if (a.q_type == TQ_CUDA_FLOAT16) static_cast<__half*>(a.out)[o] = __float2half_rn(y);
    else if (a.q_type == TQ_CUDA_BFLOAT16) static_cast<__nv_bfloat16*>(a.out)[o] = __float2bfloat16_rn(y);
    else static_cast<float*>(a.out)[o] = y;
  }
}

// 1 / sum for a merged head: 0 for an empty context (sum 0: zeros out), NaN stays NaN.
__device__ __forceinline__ float inverse_sum(float l) { return l != 0.f ? 1.f / l : 0.f; }

// The raw path (head dims other than 64/128/256, any widths): the kernel of the padded head dim D
// with 8-bit codes, fed from packed rows of the true width. A tile's rows are copied as the
// 4-byte words that cover them (the last one cut at the row's end), each row at its 8-bit row's
// place in the stage; the byte offset (0..3) of each row's first code goes into the stage next
// to the live-token word. A lane widens its share to one code per byte when it reads the tile
// (widen_codes).
template <int D>
__device__ __forceinline__ uint32_t issue_raw(const SplitArgs& a, const RowFinder& rows, int t0, uint32_t stage,
                                              int lane, bool& upper) {
  using S = Stage<D, 8, 8>;
  const int64_t row = rows(t0 + (lane & 15));  // lanes l and l + 16: the same token
  if (row >= 0)
    upper = copy_norm(stage + (lane < 16 ? S::kKeyNorm : S::kValueNorm) + 4 * (lane & 15),
                      lane < 16 ? a.cache.k_norms : a.cache.v_norms, row, rows.cells(), a.half_norms);
  auto copy_rows = [&](const uint8_t* codes, int row_bytes, int words, const FastDiv& per_row, bool values) {
    const int items = kTile * words;
    const int64_t end = rows.cells() * row_bytes;  // the code array's bytes
    for (int i0 = 0; i0 < items; i0 += 32) {  // uniform trip count: every lane takes part in the shuffle
      const int idx = min(i0 + lane, items - 1);
      const int t = per_row(idx), w = idx - t * words;
      const int64_t r = __shfl_sync(0xffffffffu, row, t);
      if (i0 + lane >= items || r < 0) continue;
      const int64_t start = r * row_bytes, at = (start & ~int64_t{3}) + 4 * w;
      const int64_t left = start + row_bytes - at;
      const uint32_t dst = stage + (values ? S::kValue + S::value_row(t) * D : S::kKey + t * D) + 4 * w;
      if (left <= 0) continue;
      if (at + 4 <= end) copy_async_4_partial(dst, codes + at, left < 4 ? static_cast<int>(left) : 4);
      else store_partial_word(dst, codes + at, static_cast<int>(left));  // the array's last word
    }
  };
  copy_rows(a.cache.k_codes, a.k_row, a.k_words, a.per_k_words, false);
  copy_rows(a.cache.v_codes, a.v_row, a.v_words, a.per_v_words, true);
  const int64_t k_at = row * a.k_row, v_at = row * a.v_row;
  const uint32_t live = __ballot_sync(0xffffffffu, row >= 0) & 0xffffu;
  const uint32_t k_off = (__ballot_sync(0xffffffffu, k_at & 1) & 0xffffu) | (__ballot_sync(0xffffffffu, k_at & 2) << 16);
  const uint32_t v_off = (__ballot_sync(0xffffffffu, v_at & 1) & 0xffffu) | (__ballot_sync(0xffffffffu, v_at & 2) << 16);
  if (lane == 0)
    asm volatile("st.shared.v2.u32 [%0], {%1, %2};" ::"r"(stage + S::kLive + 8), "r"(k_off), "r"(v_off) : "memory");
  return live;
}

template <int D, int KB, int VB, bool kRaw, bool kMean>
__global__ void __launch_bounds__(Layout<D, KB, VB>::kWarps * 32, 1) split_kernel(const SplitArgs a) {
  static_assert(!(kRaw && kMean), "the key mean runs on the packed layout only");
  using L = Layout<D, KB, VB, kMean>;
  using S = Stage<D, KB, VB>;
  constexpr int kStages = L::kStages;
  extern __shared__ float4 split_smem[];
  char* smem = reinterpret_cast<char*>(split_smem);
  uint32_t* k_table = reinterpret_cast<uint32_t*>(smem);
  uint32_t* v_table = reinterpret_cast<uint32_t*>(smem + Table<KB>::kBytes);
  float* q_rot = reinterpret_cast<float*>(smem + L::kTables);  // [group][D]
  float* q_scale = q_rot + kMaxGroup * D;                        // [group] 2^e of each head
  float* head_ml = q_scale + kMaxGroup;                          // [group][2] merged max, sum
  float* head_inv = head_ml + 2 * kMaxGroup;                     // [group] 1 / sum
  uint8_t* rings = reinterpret_cast<uint8_t*>(smem + L::kTables + L::kQuery);
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3, warp = threadIdx.x >> 5;
  const int unit = blockIdx.x, cta = blockIdx.y;
  const int pair = unit / a.chunks, head0 = (unit - pair * a.chunks) * kMaxGroup;
  const int seq = pair / a.num_kv_heads, h = pair % a.num_kv_heads;
  const int heads = min(kMaxGroup, a.group - head0);  // query heads of this CTA
  const int dim = kRaw ? a.dim : D;                    // the true head dim
  const int64_t q_row0 = static_cast<int64_t>(seq) * a.num_q_heads + static_cast<int64_t>(h) * a.group + head0;
  const int split = cta * L::kWarps + warp;
  uint8_t* const ring = rings + warp * kStages * L::kStage;
  const uint32_t ring_addr = shared_address(ring);

  int ctx = __ldg(a.cache.context_lens + seq);
  ctx = max(0, min(ctx, a.max_blocks * a.block_size));
  const int start = split * a.tiles_per_warp * kTile;
  const int end = min(start + a.tiles_per_warp * kTile, ctx);
  const int tiles = start < end ? (end - start + kTile - 1) / kTile : 0;
  const int32_t* table = a.cache.block_tables + static_cast<int64_t>(seq) * a.max_blocks;

  // Whole tiles (block size a multiple of 16): block-table entries of 32 tiles at a time (lane l:
  // tile 32k + l), the next 32 loaded early; the issuing position (entry, offset in the block)
  // advances by 16 tokens without a division. Other block sizes: a RowFinder per copied row.
  const bool whole_tiles = !kRaw && a.block_size % kTile == 0;
  auto table_chunk = [&](int k) {
    const int tile = 32 * k + lane;
    return whole_tiles && tile < tiles ? __ldg(table + (start + kTile * tile) / a.block_size) : 0;
  };
  int blocks = table_chunk(0), blocks_next = table_chunk(1);
  int offset = start % a.block_size;
  const RowFinder rows{table, a.per_block, a.block_size, a.num_blocks, a.num_kv_heads, h, end};
  const TileCopy<D, KB, VB> copy(lane, a.num_kv_heads);
  auto issue = [&](int tile) {
    const int t0 = start + kTile * tile;
    const uint32_t stage = ring_addr + (tile % kStages) * L::kStage;
    uint32_t live;
    bool upper = false;  // this lane's float16 norm is its slot's upper half
    if constexpr (kRaw) {
      live = issue_raw<D>(a, rows, t0, stage, lane, upper);
    } else if (whole_tiles) {
      if (tile > 0 && (tile & 31) == 0) {
        blocks = blocks_next;
        blocks_next = table_chunk((tile >> 5) + 1);
      }
      const int block = __shfl_sync(0xffffffffu, blocks, tile & 31);
      const bool ok = block >= 0 && block < a.num_blocks;
      const int64_t first = (static_cast<int64_t>(ok ? block : 0) * a.block_size + offset) * a.num_kv_heads + h;
      copy.issue(a.cache.k_codes, a.cache.k_norms, a.cache.v_codes, a.cache.v_norms, a.half_norms, upper, first,
                 stage);
      offset += kTile;
      if (offset == a.block_size) offset = 0;
      live = !ok ? 0u : end - t0 >= kTile ? 0xffffu : (1u << (end - t0)) - 1u;
    } else {
      live = copy.issue_rows(a.cache.k_codes, a.cache.k_norms, a.cache.v_codes, a.cache.v_norms, a.half_norms,
                             upper, rows, t0, stage);
    }
    if (a.half_norms) live |= __ballot_sync(0xffffffffu, upper) << 16;  // lanes 0-15: tokens' halves
    // a plain store: the __syncwarp after the tile's copies land orders it for the other lanes
    if (lane == 0) asm volatile("st.shared.u32 [%0], %1;" ::"r"(stage + S::kLive), "r"(live) : "memory");
  };
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < tiles) issue(j);
    commit_copies();
  }

  // While the first tiles are in flight: the tables and the pair's rotated query.
  Table<KB>::fill(k_table, a.k_codebook, kRaw ? (1 << a.k_bits) - 1 : (1 << KB) - 1);
  const bool own_value_table = !(L::kShareTable && a.k_codebook == a.v_codebook && (!kRaw || a.k_bits == a.v_bits));
  if (own_value_table) Table<VB>::fill(v_table, a.v_codebook, kRaw ? (1 << a.v_bits) - 1 : (1 << VB) - 1);
  auto query_at = [&](int64_t at) {
    return a.q_type == TQ_CUDA_FLOAT16    ? __half2float(static_cast<const __half*>(a.query)[at])
           : a.q_type == TQ_CUDA_BFLOAT16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(a.query)[at])
                                          : static_cast<const float*>(a.query)[at];
  };
  for (int e = threadIdx.x; e < heads * D; e += blockDim.x) {
    const int hh = e / D, j = e % D;
    const int64_t q = (q_row0 + hh) * dim;
    float y = 0.f;
    if constexpr (kRaw) {  // zero past the true dim
      const float* pi = a.rotation + static_cast<int64_t>(j) * dim;
      if (j < dim)
        for (int i = 0; i < dim; ++i) y = fmaf(__ldg(pi + i), query_at(q + i), y);
    } else {
      const float4* pi = reinterpret_cast<const float4*>(a.rotation + j * D);
#pragma unroll 8
      for (int i4 = 0; i4 < D / 4; ++i4) {
        const float4 p = __ldg(pi + i4);
        float x[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) x[k] = query_at(q + 4 * i4 + k);
        y = fmaf(p.x, x[0], fmaf(p.y, x[1], fmaf(p.z, x[2], fmaf(p.w, x[3], y))));
      }
    }
    q_rot[hh * D + j] = y * a.q_scale;
  }
  __syncthreads();
  if (warp < heads) {  // head `warp`: scale by 2^-e, e its largest magnitude's binade
    float m = 0.f;
    for (int j = lane; j < D; j += 32) m = fmaxf(m, fabsf(q_rot[warp * D + j]));
    const int e = binade(warp_max(m));
    for (int j = lane; j < D; j += 32) q_rot[warp * D + j] = ldexpf(q_rot[warp * D + j], -e);
    if (lane == 0) q_scale[warp] = ldexpf(1.f, e);
  }
  __syncthreads();

  Table<KB> kt{shared_address(k_table + lane)};
  Table<VB> vt{shared_address((own_value_table ? v_table : k_table) + lane)};

  // q^T B fragments: column gid = query head gid of the group, rows = this lane's key coordinates
  // (pair 2st + p of its quarter tig).
  uint32_t qb[D / 16][2];
  {
    const bool head = gid < heads;
    const float* q = q_rot + (head ? gid : 0) * D + tig * (D / 4);
#pragma unroll
    for (int st = 0; st < D / 16; ++st)
#pragma unroll
      for (int p = 0; p < 2; ++p)
        qb[st][p] = head ? half2_bits(q[2 * (2 * st + p)], q[2 * (2 * st + p) + 1]) : 0u;
  }
  // score scale of heads 2tig, 2tig+1 (2^e of their query)
  const float qs[2] = {2 * tig < heads ? q_scale[2 * tig] : 0.f, 2 * tig + 1 < heads ? q_scale[2 * tig + 1] : 0.f};

  // The key mean's coefficients, over q_rot (every warp holds its qb now): entry (2 st + s) * 32 + l
  // is (A_f, B_f) of head l / 4, f = 8 st + 4 s + l % 4, scaled by 2^-e per head; the table's word
  // (4 st + r) * 32 + l is (cos, sin)(row w_f) of A-fragment register r, row = l / 4 + 8 (r & 1),
  // f = 8 st + 4 (r >> 1) + l % 4.
  float2* mean_ab = reinterpret_cast<float2*>(q_rot);
  const uint32_t* mean_table = reinterpret_cast<const uint32_t*>(smem + L::kTables + L::kQueryHeads) + lane;
  float mean_scale[2] = {0.f, 0.f};  // 2^e * scale * log2(e) of heads 2tig, 2tig+1
  float rate[kMean ? D / 64 : 1];    // w_f of the frequencies f = lane + 32 k whose angles this lane turns
  if constexpr (kMean) {
    uint32_t* table_words = reinterpret_cast<uint32_t*>(smem + L::kTables + L::kQueryHeads);
    float* mean_exp = reinterpret_cast<float*>(smem + L::kTables + L::kQueryHeads + L::kMeanTable);
    __syncthreads();
    const float* mu = a.key_mean + static_cast<int64_t>(h) * D;
    for (int e = threadIdx.x; e < (D / 16) * 2 * 32; e += blockDim.x) {
      const int l = e & 31, hh = l >> 2, f = 8 * (e >> 6) + 4 * ((e >> 5) & 1) + (l & 3);
      float2 ab = make_float2(0.f, 0.f);
      if (hh < heads) {
        const int64_t q = (q_row0 + hh) * D;
        const float q1 = query_at(q + f), q2 = query_at(q + f + D / 2);
        const float m1 = __ldg(mu + f), m2 = __ldg(mu + f + D / 2);
        ab = make_float2(q1 * m1 + q2 * m2, q2 * m1 - q1 * m2);
      }
      mean_ab[e] = ab;
    }
    for (int e = threadIdx.x; e < (D / 16) * 4 * 32; e += blockDim.x) {
      const int l = e & 31, r = (e >> 5) & 3;
      const int row = (l >> 2) + 8 * (r & 1), f = 8 * (e >> 7) + 4 * (r >> 1) + (l & 3);
      float sn, cs;
      sincosf(static_cast<float>(row) * __ldg(a.rope_inv_freq + f), &sn, &cs);
      table_words[e] = half2_bits(cs, sn);
    }
    __syncthreads();
    if (warp < heads) {  // head `warp`: its coefficients scaled by 2^-e into fp16 range, as its query
      auto at = [&](int j) -> float2& { return mean_ab[(j >> 2) * 32 + 4 * warp + (j & 3)]; };
      float m = 0.f;
      for (int j = lane; j < D / 2; j += 32) m = fmaxf(m, fmaxf(fabsf(at(j).x), fabsf(at(j).y)));
      const int e = binade(warp_max(m));
      for (int j = lane; j < D / 2; j += 32) at(j) = make_float2(ldexpf(at(j).x, -e), ldexpf(at(j).y, -e));
      if (lane == 0) mean_exp[warp] = ldexpf(1.f, e);
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < 2; ++c) mean_scale[c] = 2 * tig + c < heads ? mean_exp[2 * tig + c] * a.q_scale : 0.f;
#pragma unroll
    for (int k = 0; k < D / 64; ++k) rate[k] = __ldg(a.rope_inv_freq + lane + 32 * k);
  }

  float acc[D / 16][4];
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  float m[2] = {kNoScore, kNoScore}, l[2] = {0.f, 0.f};  // heads 2tig, 2tig+1
  float sigma = 0.f, inv_sigma = 0.f;  // running largest value norm of the warp, its inverse

  for (int i = 0; i < tiles; ++i) {
    if (i + kStages - 1 < tiles) issue(i + kStages - 1);
    commit_copies();
    wait_copies<kStages - 1>();  // tile i has landed
    uint8_t* const stage = ring + (i % kStages) * L::kStage;
    if (a.half_norms)  // the float16 norm this lane copied, as float32 in its slot before the others read it
      widen_norm(stage + (lane < 16 ? S::kKeyNorm : S::kValueNorm) + 4 * (lane & 15),
                 *reinterpret_cast<const uint32_t*>(stage + S::kLive) >> (16 + (lane & 15)));
    __syncwarp();
    Tile<D, KB, VB> tile;
    if constexpr (kRaw) tile.read_raw_keys(stage, gid, tig, a.k_bits);
    else tile.read(stage, gid, tig);
    const float* k_norm = reinterpret_cast<const float*>(stage + S::kKeyNorm);
    const float* v_norm = reinterpret_cast<const float*>(stage + S::kValueNorm);
    const uint32_t live = *reinterpret_cast<const uint32_t*>(stage + S::kLive);
    const bool live0 = (live >> gid) & 1u, live1 = (live >> (gid + 8)) & 1u;

    float s[4] = {0.f, 0.f, 0.f, 0.f};  // (tok gid: heads 2tig, 2tig+1), (tok gid+8: same)
    key_scores(tile, kt, qb, s);
    float km[4] = {0.f, 0.f, 0.f, 0.f};  // the key mean's term (kMean), same layout
    if constexpr (kMean) {
      const int t0 = start + kTile * i;
      float cs[D / 64], sn[D / 64];
#pragma unroll
      for (int k = 0; k < D / 64; ++k) reduced_sincos(static_cast<float>(t0) * rate[k], sn[k], cs[k]);
#pragma unroll
      for (int st = 0; st < D / 16; ++st) {
        uint32_t b[2];
#pragma unroll
        for (int hs = 0; hs < 2; ++hs) {  // frequency f = 8 st + 4 hs + tig, turned by t0 w_f
          const int src = (8 * st + 4 * hs) % 32 + tig, k = (8 * st + 4 * hs) / 32;
          const float c = __shfl_sync(0xffffffffu, cs[k], src), sv = __shfl_sync(0xffffffffu, sn[k], src);
          const float2 ab = mean_ab[(2 * st + hs) * 32 + lane];
          b[hs] = half2_bits(fmaf(ab.x, c, ab.y * sv), fmaf(ab.y, c, -ab.x * sv));
        }
        const uint32_t frag[4] = {mean_table[(4 * st) * 32], mean_table[(4 * st + 1) * 32],
                                  mean_table[(4 * st + 2) * 32], mean_table[(4 * st + 3) * 32]};
        mma_16816(km, frag, b[0], b[1]);
      }
      if (t0 == 0 && gid == 0) km[0] = km[1] = 0.f;  // position 0 has no term
#pragma unroll
      for (int e = 0; e < 4; ++e) km[e] *= mean_scale[e & 1];
    }
    const float kn0 = k_norm[gid], kn1 = k_norm[gid + 8];
    if constexpr (kMean) {
      s[0] = live0 ? fmaf(s[0], kn0 * qs[0], km[0]) : -INFINITY;
      s[1] = live0 ? fmaf(s[1], kn0 * qs[1], km[1]) : -INFINITY;
      s[2] = live1 ? fmaf(s[2], kn1 * qs[0], km[2]) : -INFINITY;
      s[3] = live1 ? fmaf(s[3], kn1 * qs[1], km[3]) : -INFINITY;
    } else {
      s[0] = live0 ? s[0] * (kn0 * qs[0]) : -INFINITY;
      s[1] = live0 ? s[1] * (kn0 * qs[1]) : -INFINITY;
      s[2] = live1 ? s[2] * (kn1 * qs[0]) : -INFINITY;
      s[3] = live1 ? s[3] * (kn1 * qs[1]) : -INFINITY;
    }
    const float vn0 = live0 ? v_norm[gid] : 0.f, vn1 = live1 ? v_norm[gid + 8] : 0.f;
    float p[4], alpha[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float m_new = fmaxf(m[c], group_max(fmaxf(s[c], s[c + 2])));
      const float base = softmax_base(m_new);
      alpha[c] = fast_exp2(m[c] - base);  // exactly 1 while the max stands
      p[c] = fast_exp2(s[c] - base);
      p[c + 2] = fast_exp2(s[c + 2] - base);
      l[c] = l[c] * alpha[c] + p[c] + p[c + 2];
      m[c] = m_new;
    }
    // sigma: the largest value norm so far (over the warp), so that p * ||v|| / sigma <= 1
    const float tile_sigma = fmaxf(sigma, group_max(fmaxf(vn0, vn1)));
    const float grow = tile_sigma > sigma ? sigma * (1.f / tile_sigma) : 1.f;  // 0 on the first live tile
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f || grow != 1.f)) {
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) {
        acc[mt][0] *= alpha[0] * grow;
        acc[mt][1] *= alpha[1] * grow;
        acc[mt][2] *= alpha[0] * grow;
        acc[mt][3] *= alpha[1] * grow;
      }
      if (tile_sigma > sigma) {
        sigma = tile_sigma;
        inv_sigma = 1.f / sigma;
      }
    }
    const float w0 = vn0 * inv_sigma, w1 = vn1 * inv_sigma;
    const uint32_t p0 = transpose_8x8(half2_bits(p[0] * w0, p[1] * w0));
    const uint32_t p1 = transpose_8x8(half2_bits(p[2] * w1, p[3] * w1));
    if constexpr (kRaw) tile.read_raw_values(stage, gid, tig, a.v_bits);
    accumulate_values(tile, vt, p0, p1, acc);
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  wait_copies<0>();
  l[0] = group_sum(l[0]);
  l[1] = group_sum(l[1]);

  // Each warp's (m, l, sigma * acc) into shared memory (over the rings), then the CTA merges its
  // warps: M = max_w m_w, L = sum_w l_w 2^(m_w - M), acc = sum_w acc_w 2^(m_w - M).
  __syncthreads();
  const int row = D + 2;
  float* scratch = reinterpret_cast<float*>(rings);  // [warps][heads][D + 2]
  {
    float* mine = scratch + warp * heads * row;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int head = 2 * tig + c;
      if (gid == 0 && head < heads) {
        mine[head * row + D] = m[c];
        mine[head * row + D + 1] = l[c];
      }
    }
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int head = 2 * tig + (e & 1);
        if (head < heads) mine[head * row + gid * (D / 8) + 2 * mt + (e >> 1)] = acc[mt][e] * sigma;
      }
  }
  __syncthreads();
  float* merged = q_rot;  // [heads][D] (the query is in the registers now)
  for (int e = threadIdx.x; e < heads * D; e += blockDim.x) {
    const int head = e / D, d = e % D;
    float big = kNoScore;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) big = fmaxf(big, scratch[(w * heads + head) * row + D]);
    float total = 0.f, sum = 0.f;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) {
      const float* r = scratch + (w * heads + head) * row;
      const float f = fast_exp2(r[D] - softmax_base(big));
      total += f * r[D + 1];
      sum += f * r[d];
    }
    merged[head * D + d] = sum;
    if (d == 0) {
      head_ml[2 * head] = big;
      head_ml[2 * head + 1] = total;
    }
  }
  __syncthreads();

  if (a.ctas_per_pair == 1) {
    if (threadIdx.x < heads) head_inv[threadIdx.x] = inverse_sum(head_ml[2 * threadIdx.x + 1]);
    __syncthreads();
    rotate_back(a, q_row0, heads, dim, merged, D, head_inv);
    return;
  }
  // Several CTAs per unit: publish this CTA's partial; the last CTA of the unit merges them all.
  const int stride = a.chunk_heads;
  const int64_t part = static_cast<int64_t>(unit) * a.ctas_per_pair + cta;
  for (int e = threadIdx.x; e < heads * D; e += blockDim.x) a.part_acc[part * stride * D + e] = merged[e];
  if (threadIdx.x < 2 * heads) a.part_ml[part * 2 * stride + threadIdx.x] = head_ml[threadIdx.x];
  __threadfence();
  __syncthreads();
  __shared__ int last;
  if (threadIdx.x == 0) last = atomicAdd(a.counters + unit, 1) == a.ctas_per_pair - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // the other CTAs' partials are visible
  const int64_t first = static_cast<int64_t>(unit) * a.ctas_per_pair;
  const float* ml = a.part_ml + first * 2 * stride;  // [ctas][stride][2]
  if (threadIdx.x < heads) {
    const int head = threadIdx.x;
    float big = kNoScore;
    for (int c = 0; c < a.ctas_per_pair; ++c) big = fmaxf(big, __ldcg(ml + (c * stride + head) * 2));
    big = softmax_base(big);
    float total = 0.f;
    for (int c = 0; c < a.ctas_per_pair; ++c) {
      const float* r = ml + (c * stride + head) * 2;
      total += fast_exp2(__ldcg(r) - big) * __ldcg(r + 1);
    }
    head_ml[2 * head] = big;
    head_inv[head] = inverse_sum(total);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < heads * D; e += blockDim.x) {
    const int head = e / D;
    const float big = head_ml[2 * head];
    float sum = 0.f;
    for (int c = 0; c < a.ctas_per_pair; ++c)
      sum = fmaf(fast_exp2(__ldcg(ml + (c * stride + head) * 2) - big),
                 __ldcg(a.part_acc + (first + c) * stride * D + e), sum);
    merged[e] = sum;
  }
  __syncthreads();
  rotate_back(a, q_row0, heads, dim, merged, D, head_inv);
}

template <int D, int KB, int VB, bool kRaw = false, bool kMean = false>
int launch(const SplitArgs& args, const Plan& plan, unsigned units, cudaStream_t stream) {
  using L = Layout<D, KB, VB, kMean>;
  if (int rc = reserve_shared(split_kernel<D, KB, VB, kRaw, kMean>, L::kShared)) return rc;
  split_kernel<D, KB, VB, kRaw, kMean><<<dim3(units, plan.ctas_per_pair), L::kWarps * 32, L::kShared, stream>>>(args);
  return launch_status();
}

// The raw path's instances (tq_paged_attention_mma_raw.cu): padded head dims 32, 48, ..., 256.
int launch_raw(const SplitArgs& args, const Plan& plan, unsigned units, int padded_dim, cudaStream_t stream);

// Every pair of widths 1..8 has an instance, with and without the key mean; each head dim's 64 of
// each kind are compiled in their own translation unit (tq_paged_attention_mma_d<D>[_mean].cu),
// declared here.
template <int D, bool kMean>
int launch_bits(const SplitArgs& args, const Plan& plan, unsigned units, int kb, int vb, cudaStream_t stream);
#define TQ_MMA_DECLARE_LAUNCH_BITS(D, M)                                                                \
  template <>                                                                                          \
  int launch_bits<D, M>(const SplitArgs& args, const Plan& plan, unsigned units, int kb, int vb,        \
                        cudaStream_t stream);
TQ_MMA_DECLARE_LAUNCH_BITS(64, false) TQ_MMA_DECLARE_LAUNCH_BITS(128, false) TQ_MMA_DECLARE_LAUNCH_BITS(256, false)
TQ_MMA_DECLARE_LAUNCH_BITS(64, true) TQ_MMA_DECLARE_LAUNCH_BITS(128, true) TQ_MMA_DECLARE_LAUNCH_BITS(256, true)
#undef TQ_MMA_DECLARE_LAUNCH_BITS

#define TQ_MMA_CASE(D, K, V, M) \
  if (kb == K && vb == V) return launch<D, K, V, false, M>(args, plan, units, stream);
#define TQ_MMA_VALUES(D, K, M) \
  TQ_MMA_CASE(D, K, 1, M) TQ_MMA_CASE(D, K, 2, M) TQ_MMA_CASE(D, K, 3, M) TQ_MMA_CASE(D, K, 4, M) \
  TQ_MMA_CASE(D, K, 5, M) TQ_MMA_CASE(D, K, 6, M) TQ_MMA_CASE(D, K, 7, M) TQ_MMA_CASE(D, K, 8, M)
// The definition of launch_bits<D, M>, for the one translation unit that instantiates it.
#define TQ_MMA_DEFINE_LAUNCH_BITS(D, M)                                                                 \
  template <>                                                                                          \
  int launch_bits<D, M>(const SplitArgs& args, const Plan& plan, unsigned units, int kb, int vb,        \
                        cudaStream_t stream) {                                                         \
    TQ_MMA_VALUES(D, 1, M) TQ_MMA_VALUES(D, 2, M) TQ_MMA_VALUES(D, 3, M) TQ_MMA_VALUES(D, 4, M)       \
    TQ_MMA_VALUES(D, 5, M) TQ_MMA_VALUES(D, 6, M) TQ_MMA_VALUES(D, 7, M) TQ_MMA_VALUES(D, 8, M)       \
    return TQ_CUDA_BAD_ARGUMENT;                                                                       \
  }

}  // namespace mma
}  // namespace tq_cuda
