// TQPagedAttention for every shape the tensor-core kernel does not take (head dims past 256, up to
// 512; codes whose base pointers miss its copy alignment), on CUDA cores; any bit widths 1..8,
// block size and number of query heads per KV head.
//
// Three launches:
//   rotate   q_rot = Pi q * scale * log2(e), float32, into the workspace
//   split    one warp per (sequence, KV head, chunk of <= 8 query heads, split of the context),
//            32 tokens per step. The step's packed key and value rows are copied into the warp's
//            shared memory (a row per load instruction, coalesced); then
//              scores   lane = token: codes unpacked from its row, centroids from a shared
//                       codebook, dotted with the chunk's q_rot (float4 broadcasts)
//              softmax  online, base 2, the running max shared by the warp
//              values   lane = coordinates lane, lane + 32, ...: sum over the step's tokens of
//                       p * ||v|| * c_v[code]
//            and writes the split's (max, sum, acc) to the workspace
//   merge    per query head: the splits merged, then out = Pi^T (acc / sum) in the query's dtype
// float32 throughout (no fp16 rounding of P * ||v||).
//
// The key mean (key_mean and rope_inv_freq given): the split kernel also stages, per query head of
// its chunk, A_j and B_j of the unrotated query (tq_cuda.h), scaled like q_rot, and the lane of a
// token at position t >= 1 adds sum_j A_j cos(t w_j) + B_j sin(t w_j) to its scores (accurate
// sincosf: the angles reach 1e5 and more).
#include <math.h>

#include <algorithm>

#include "tq_cuda_common.cuh"
#include "tq_paged_attention_plan.h"

namespace tq_cuda {
namespace generic {
namespace {

constexpr int kStep = 32;        // tokens per step: one per lane
constexpr int kWarps = 4;        // splits per CTA
constexpr int kHeadChunk = 8;    // query heads per warp

// One warp's view of the split kernel's work (the tensor-core kernel's is mma::SplitArgs).
struct WarpArgs {
  const float* q_rot;  // [S * Hq, D]
  PagedCacheArgs cache;
  const float* k_codebook;
  const float* v_codebook;
  int dim, k_bits, v_bits, num_kv_heads, num_q_heads, group, block_size, max_blocks, num_blocks;
  int tokens_per_split, splits, head_chunks;
  int k_row_words, v_row_words;  // shared-memory stride of a staged row, in words (odd: no conflicts)
  float* partial;                // [pairs, head_chunks, splits, kHeadChunk, D + 2]
  // the key mean, or null: the unrotated query, [Hkv, D] means, [D / 2] RoPE rates
  const void* query;
  tq_cuda_dtype q_type;
  const float* key_mean;
  const float* rope_inv_freq;
  float q_scale;  // softmax scale * log2(e), as q_rot carries it
};

// Floats of the split kernel's shared memory ahead of the warps' rows: the codebooks, the chunk's
// q_rot and, with the key mean, its A and B.
__host__ __device__ inline int head_floats(int dim, int heads, bool key_mean) {
  const int qd = (dim + 3) & ~3;
  return 512 + (key_mean ? 2 : 1) * heads * qd;
}

// Element i of the query in its dtype, as float32.
__device__ __forceinline__ float query_value(const void* query, tq_cuda_dtype type, int64_t i) {
  if (type == TQ_CUDA_FLOAT16) return __half2float(static_cast<const __half*>(query)[i]);
  if (type == TQ_CUDA_BFLOAT16) return __bfloat162float(static_cast<const __nv_bfloat16*>(query)[i]);
  return static_cast<const float*>(query)[i];
}

// Copies `bytes` of a packed row into shared words, the warp's lanes taking consecutive words
// (or bytes, where the row is not a whole number of aligned words).
__device__ __forceinline__ void copy_row(const uint8_t* src, int bytes, bool words, uint32_t* dst, int lane) {
  if (words) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(src);
    for (int i = lane; i < bytes / 4; i += 32) dst[i] = __ldg(w + i);
    return;
  }
  uint8_t* d = reinterpret_cast<uint8_t*>(dst);
  for (int b = lane; b < bytes; b += 32) d[b] = src[b];
}

// A lane's sequential reader of its staged row's codes.
struct CodeReader {
  const uint32_t* words;
  uint64_t buffer;
  int have, next;
  __device__ __forceinline__ CodeReader(const uint32_t* w) : words(w), buffer(0), have(0), next(0) {}
  __device__ __forceinline__ uint32_t take(int bits) {
    if (have < bits) {
      buffer |= static_cast<uint64_t>(words[next++]) << have;
      have += 32;
    }
    const uint32_t code = static_cast<uint32_t>(buffer) & ((1u << bits) - 1u);
    buffer >>= bits;
    have -= bits;
    return code;
  }
};

// KM: the key mean's term (a.key_mean not null); the instances without it are the plain kernel.
// HN: the cache's norms are float16 (else float32).
template <int KC, int GH, bool KM, bool HN>
__global__ void __launch_bounds__(kWarps * 32) split_kernel(const WarpArgs a) {
  extern __shared__ float4 generic_smem[];
  float* smem = reinterpret_cast<float*>(generic_smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pair = blockIdx.x, chunk = blockIdx.y, split = blockIdx.z * kWarps + warp;
  const int seq = pair / a.num_kv_heads, h = pair % a.num_kv_heads;
  const int heads = min(GH, a.group - chunk * GH);  // query heads of this chunk
  const int d = a.dim;
  // shared: codebooks, the chunk's q_rot (and the key mean's A, B), then per warp: key rows, value
  // rows, weights
  constexpr bool key_mean = KM;
  float* kcb = smem;
  float* vcb = kcb + 256;
  float* q = vcb + 256;  // [GH][dim rounded up to 4]
  const int qd = (d + 3) & ~3;
  float* mean_ab = q + GH * qd;  // key mean: [GH][qd], A_j at j, B_j at D/2 + j
  uint32_t* warp_base = reinterpret_cast<uint32_t*>(mean_ab + (key_mean ? GH * qd : 0)) +  // head_floats
                        warp * (kStep * (a.k_row_words + a.v_row_words) + GH * kStep);
  uint32_t* k_rows = warp_base;
  uint32_t* v_rows = k_rows + kStep * a.k_row_words;
  float* weights = reinterpret_cast<float*>(v_rows + kStep * a.v_row_words);  // [GH][32]: p * ||v||

  for (int i = threadIdx.x; i < (1 << a.k_bits); i += blockDim.x) kcb[i] = __ldg(a.k_codebook + i);
  for (int i = threadIdx.x; i < (1 << a.v_bits); i += blockDim.x) vcb[i] = __ldg(a.v_codebook + i);
  const int64_t q_row0 = (static_cast<int64_t>(seq) * a.num_q_heads + static_cast<int64_t>(h) * a.group + chunk * GH);
  for (int i = threadIdx.x; i < GH * qd; i += blockDim.x) {
    const int hh = i / qd, j = i % qd;
    q[i] = hh < heads && j < d ? a.q_rot[(q_row0 + hh) * d + j] : 0.f;
  }
  const int half = d / 2;
  if constexpr (key_mean) {
    const float* mu = a.key_mean + static_cast<int64_t>(h) * d;
    for (int i = threadIdx.x; i < GH * half; i += blockDim.x) {
      const int hh = i / half, j = i % half;
      float x = 0.f, y = 0.f;
      if (hh < heads) {
        const int64_t at = (q_row0 + hh) * d + j;
        const float q1 = query_value(a.query, a.q_type, at), q2 = query_value(a.query, a.q_type, at + half);
        const float m1 = __ldg(mu + j), m2 = __ldg(mu + j + half);
        x = (q1 * m1 + q2 * m2) * a.q_scale;
        y = (q2 * m1 - q1 * m2) * a.q_scale;
      }
      mean_ab[hh * qd + j] = x;
      mean_ab[hh * qd + half + j] = y;
    }
  }
  __syncthreads();
  if (split >= a.splits) return;

  int ctx = __ldg(a.cache.context_lens + seq);
  ctx = max(0, min(ctx, a.max_blocks * a.block_size));
  const int start = split * a.tokens_per_split;
  const int end = min(start + a.tokens_per_split, ctx);
  const int32_t* table = a.cache.block_tables + static_cast<int64_t>(seq) * a.max_blocks;
  const int k_bytes = (d * a.k_bits + 7) / 8, v_bytes = (d * a.v_bits + 7) / 8;
  const bool k_words = (k_bytes & 3) == 0 && (reinterpret_cast<uintptr_t>(a.cache.k_codes) & 3) == 0;
  const bool v_words = (v_bytes & 3) == 0 && (reinterpret_cast<uintptr_t>(a.cache.v_codes) & 3) == 0;

  float m[GH], l[GH], acc[GH][KC];
#pragma unroll
  for (int g = 0; g < GH; ++g) {
    m[g] = kNoScore;
    l[g] = 0.f;
#pragma unroll
    for (int k = 0; k < KC; ++k) acc[g][k] = 0.f;
  }

  for (int t0 = start; t0 < end; t0 += kStep) {
    // the step's cache cells (lane = token); a block-table entry outside [0, N) skips its token
    const int t = t0 + lane;
    int64_t cell = -1;
    if (t < end) {
      const int block = __ldg(table + t / a.block_size);
      if (block >= 0 && block < a.num_blocks)
        cell = (static_cast<int64_t>(block) * a.block_size + t % a.block_size) * a.num_kv_heads + h;
    }
    __syncwarp();
    for (int r = 0; r < kStep; ++r) {
      const int64_t c = __shfl_sync(0xffffffffu, cell, r);
      if (c < 0) continue;
      copy_row(a.cache.k_codes + c * k_bytes, k_bytes, k_words, k_rows + r * a.k_row_words, lane);
      copy_row(a.cache.v_codes + c * v_bytes, v_bytes, v_words, v_rows + r * a.v_row_words, lane);
    }
    const float kn = cell >= 0 ? load_norm<HN>(a.cache.k_norms, cell) : 0.f;
    const float vn = cell >= 0 ? load_norm<HN>(a.cache.v_norms, cell) : 0.f;
    __syncwarp();

    // scores of the lane's token
    float s[GH];
#pragma unroll
    for (int g = 0; g < GH; ++g) s[g] = 0.f;
    if (cell >= 0) {
      CodeReader codes(k_rows + lane * a.k_row_words);
      for (int i = 0; i < d; i += 4) {
        float c[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) c[k] = i + k < d ? kcb[codes.take(a.k_bits)] : 0.f;
#pragma unroll
        for (int g = 0; g < GH; ++g) {
          const float4 qv = *reinterpret_cast<const float4*>(q + g * qd + i);
          s[g] = fmaf(c[0], qv.x, fmaf(c[1], qv.y, fmaf(c[2], qv.z, fmaf(c[3], qv.w, s[g]))));
        }
      }
    }
    // the key mean's term, q . R_t mu (scaled like s), for a token at position t >= 1
    float km[GH];
#pragma unroll
    for (int g = 0; g < GH; ++g) km[g] = 0.f;
    if (key_mean && cell >= 0 && t > 0) {
      const float position = static_cast<float>(t);
      for (int j = 0; j < half; ++j) {
        float sn, cs;
        sincosf(position * __ldg(a.rope_inv_freq + j), &sn, &cs);
#pragma unroll
        for (int g = 0; g < GH; ++g) km[g] = fmaf(mean_ab[g * qd + j], cs, fmaf(mean_ab[g * qd + half + j], sn, km[g]));
      }
    }
    // online softmax over the warp's 32 tokens; weights p * ||v|| for the value pass
#pragma unroll
    for (int g = 0; g < GH; ++g) {
      const float score = cell >= 0 && g < heads ? (key_mean ? fmaf(s[g], kn, km[g]) : s[g] * kn) : -INFINITY;
      const float m_new = fmaxf(m[g], warp_max(score));
      const float base = softmax_base(m_new);
      const float alpha = exp2f(m[g] - base);
      const float p = exp2f(score - base);
      l[g] = l[g] * alpha + p;  // per lane; summed over the warp at the end
      m[g] = m_new;
#pragma unroll
      for (int k = 0; k < KC; ++k) acc[g][k] *= alpha;
      weights[g * kStep + lane] = p * vn;
    }
    __syncwarp();
    // values: lane = coordinates lane + 32 k
    const int n = min(kStep, end - t0);
    for (int r = 0; r < n; ++r) {
      const uint8_t* row = reinterpret_cast<const uint8_t*>(v_rows + r * a.v_row_words);
      float c[KC];
#pragma unroll
      for (int k = 0; k < KC; ++k) {
        const int j = lane + 32 * k;
        c[k] = j < d ? vcb[unpack_code(row, j, a.v_bits)] : 0.f;
      }
#pragma unroll
      for (int g = 0; g < GH; ++g) {
        const float w = weights[g * kStep + r];
#pragma unroll
        for (int k = 0; k < KC; ++k) acc[g][k] = fmaf(w, c[k], acc[g][k]);
      }
    }
    __syncwarp();
  }

  const int64_t row = d + 2;
  float* out = a.partial + ((static_cast<int64_t>(pair) * a.head_chunks + chunk) * a.splits + split) * GH * row;
#pragma unroll
  for (int g = 0; g < GH; ++g) {
    const float total = warp_sum(l[g]);
    if (g >= heads) continue;
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      const int j = lane + 32 * k;
      if (j < d) out[g * row + j] = acc[g][k];
    }
    if (lane == 0) {
      out[g * row + d] = m[g];
      out[g * row + d + 1] = total;
    }
  }
}

// q_rot[r] = Pi q[r] * scale for 8 rows per CTA.
constexpr int kRotateRows = 8;
template <typename T>
__global__ void __launch_bounds__(128) rotate_kernel(const T* query, const float* rotation, int rows, int dim,
                                                     float scale, float* q_rot) {
  extern __shared__ float rotate_smem[];  // [8][dim]
  const int r0 = blockIdx.x * kRotateRows;
  for (int i = threadIdx.x; i < kRotateRows * dim; i += blockDim.x) {
    const int r = i / dim;
    rotate_smem[i] = r0 + r < rows ? to_float(query[static_cast<int64_t>(r0) * dim + i]) : 0.f;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float y[kRotateRows] = {};
    const float* pi = rotation + static_cast<int64_t>(j) * dim;
    for (int i = 0; i < dim; ++i) {
      const float p = __ldg(pi + i);
#pragma unroll
      for (int r = 0; r < kRotateRows; ++r) y[r] = fmaf(p, rotate_smem[r * dim + i], y[r]);
    }
#pragma unroll
    for (int r = 0; r < kRotateRows; ++r)
      if (r0 + r < rows) q_rot[static_cast<int64_t>(r0 + r) * dim + j] = y[r] * scale;
  }
}

// One output row (sequence, query head): merge the splits, out = Pi^T (acc / sum); zeros for an
// empty context (sum 0), NaN stays NaN.
template <typename T>
__global__ void __launch_bounds__(128) merge_kernel(const float* partial, const float* rotation, int dim, int group,
                                                    int head_chunks, int splits, T* out) {
  extern __shared__ float merge_smem[];  // [dim] merged accumulator, [2] max and 1 / sum
  const int row = blockIdx.x;  // = pair * group + g
  const int pair = row / group, g = row % group, chunk = g / kHeadChunk, gh = g % kHeadChunk;
  const int64_t stride = dim + 2;
  const float* base = partial + (static_cast<int64_t>(pair) * head_chunks + chunk) * splits * kHeadChunk * stride +
                      gh * stride;
  float* merged = merge_smem;
  if (threadIdx.x == 0) {
    float big = kNoScore, total = 0.f;
    for (int s = 0; s < splits; ++s) big = fmaxf(big, base[s * kHeadChunk * stride + dim]);
    big = softmax_base(big);
    for (int s = 0; s < splits; ++s)
      total += exp2f(base[s * kHeadChunk * stride + dim] - big) * base[s * kHeadChunk * stride + dim + 1];
    merged[dim] = big;
    merged[dim + 1] = total != 0.f ? 1.f / total : 0.f;
  }
  __syncthreads();
  const float big = merged[dim], inv = merged[dim + 1];
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s)
      sum = fmaf(exp2f(base[s * kHeadChunk * stride + dim] - big), base[s * kHeadChunk * stride + j], sum);
    merged[j] = sum * inv;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float y = 0.f;
    for (int i = 0; i < dim; ++i) y = fmaf(merged[i], __ldg(rotation + static_cast<int64_t>(i) * dim + j), y);
    out[static_cast<int64_t>(row) * dim + j] = from_float<T>(y);
  }
}

int odd_words(int bytes) {
  const int words = (bytes + 3) / 4;
  return words | 1;
}

template <int KC, int GH, bool KM, bool HN>
int launch_split(const WarpArgs& args, unsigned pairs, cudaStream_t stream) {
  const size_t shared = head_floats(args.dim, GH, KM) * sizeof(float) +
                        kWarps * (kStep * (args.k_row_words + args.v_row_words) + GH * kStep) * sizeof(uint32_t);
  if (int rc = reserve_shared(split_kernel<KC, GH, KM, HN>, shared)) return rc;
  const dim3 grid(pairs, args.head_chunks, (args.splits + kWarps - 1) / kWarps);
  split_kernel<KC, GH, KM, HN><<<grid, kWarps * 32, shared, stream>>>(args);
  return launch_status();
}

template <int KC, bool HN>
int launch_split_for(const WarpArgs& args, unsigned pairs, cudaStream_t stream) {
  return args.key_mean != nullptr ? launch_split<KC, kHeadChunk, true, HN>(args, pairs, stream)
                                  : launch_split<KC, kHeadChunk, false, HN>(args, pairs, stream);
}

// float16 cache norms: their own instances (few), so that the float32 ones compile as before
template <int KC>
int launch_split_any(const WarpArgs& args, unsigned pairs, bool half, cudaStream_t stream) {
  return half ? launch_split_for<KC, true>(args, pairs, stream) : launch_split_for<KC, false>(args, pairs, stream);
}

template <typename T>
int rotate_and_merge_launch(bool rotate, const T* query, const float* rotation, int rows, int dim, float scale,
                            float* q_rot, const float* partial, int group, int head_chunks, int splits, T* out,
                            cudaStream_t stream) {
  if (rotate) {
    const size_t shared = kRotateRows * static_cast<size_t>(dim) * sizeof(float);
    if (int rc = reserve_shared(rotate_kernel<T>, shared)) return rc;
    rotate_kernel<T><<<(rows + kRotateRows - 1) / kRotateRows, 128, shared, stream>>>(query, rotation, rows, dim, scale,
                                                                                     q_rot);
    return launch_status();
  }
  const size_t shared = (static_cast<size_t>(dim) + 2) * sizeof(float);
  if (int rc = reserve_shared(merge_kernel<T>, shared)) return rc;
  merge_kernel<T><<<rows, 128, shared, stream>>>(partial, rotation, dim, group, head_chunks, splits, out);
  return launch_status();
}

int rotate_or_merge(bool rotate, tq_cuda_dtype type, const void* query, const float* rotation, int rows, int dim,
                    float scale, float* q_rot, const float* partial, int group, int head_chunks, int splits, void* out,
                    cudaStream_t stream) {
  switch (type) {
    case TQ_CUDA_FLOAT32:
      return rotate_and_merge_launch(rotate, static_cast<const float*>(query), rotation, rows, dim, scale, q_rot,
                                     partial, group, head_chunks, splits, static_cast<float*>(out), stream);
    case TQ_CUDA_FLOAT16:
      return rotate_and_merge_launch(rotate, static_cast<const __half*>(query), rotation, rows, dim, scale, q_rot,
                                     partial, group, head_chunks, splits, static_cast<__half*>(out), stream);
    case TQ_CUDA_BFLOAT16:
      return rotate_and_merge_launch(rotate, static_cast<const __nv_bfloat16*>(query), rotation, rows, dim, scale,
                                     q_rot, partial, group, head_chunks, splits, static_cast<__nv_bfloat16*>(out),
                                     stream);
  }
  return TQ_CUDA_BAD_ARGUMENT;
}

}  // namespace

Plan make_plan(int64_t num_seqs, int64_t hkv, int64_t hq, int64_t dim, int64_t max_blocks, int64_t block_size,
               int64_t tokens_per_split, int sms) {
  const int64_t group = hq / hkv, pairs = num_seqs * hkv;
  Plan p{};
  p.head_chunks = static_cast<int>((group + kHeadChunk - 1) / kHeadChunk);
  const int64_t tokens = std::max<int64_t>(1, max_blocks * block_size);
  int64_t per_split = tokens_per_split;
  if (per_split <= 0) {
    // about 16 warps per SM, at least 4 steps per split
    const int64_t want = std::max<int64_t>(1, 16 * static_cast<int64_t>(sms) / std::max<int64_t>(pairs * p.head_chunks, 1));
    per_split = std::max<int64_t>((tokens + want - 1) / want, 4 * kStep);
  }
  per_split = (per_split + kStep - 1) / kStep * kStep;
  p.tokens_per_split = static_cast<int>(std::min<int64_t>(per_split, tokens));
  p.splits = static_cast<int>((tokens + p.tokens_per_split - 1) / p.tokens_per_split);
  const size_t parts = static_cast<size_t>(pairs) * p.head_chunks * p.splits * kHeadChunk * (dim + 2);
  p.q_offset = 0;
  p.acc_offset = align256(static_cast<size_t>(num_seqs * hq * dim) * sizeof(float));
  p.workspace_bytes = p.acc_offset + align256(parts * sizeof(float));
  return p;
}

int run(const AttentionCall& c, const Plan& plan) {
  const int64_t hq = c.num_q_heads, hkv = c.num_kv_heads;
  const int k_bits = c.k_bits, v_bits = c.v_bits;
  const tq_cuda_dtype q_type = static_cast<tq_cuda_dtype>(c.dtype);
  cudaStream_t stream = static_cast<cudaStream_t>(c.stream);
  char* ws = static_cast<char*>(c.workspace);
  float* q_rot = reinterpret_cast<float*>(ws + plan.q_offset);
  float* partial = reinterpret_cast<float*>(ws + plan.acc_offset);
  const int rows = static_cast<int>(c.num_seqs * hq), d = static_cast<int>(c.head_dim);
  if (int rc = rotate_or_merge(true, q_type, c.query, c.rotation, rows, d, plan.scale * kLog2e, q_rot, nullptr, 0, 0,
                               0, nullptr, stream))
    return rc;
  WarpArgs args{};
  args.q_rot = q_rot;
  args.cache = cache_args(c);
  args.k_codebook = c.k_codebook;
  args.v_codebook = c.v_codebook;
  args.dim = d;
  args.k_bits = k_bits;
  args.v_bits = v_bits;
  set_sizes(args, c);
  args.tokens_per_split = plan.tokens_per_split;
  args.splits = plan.splits;
  args.head_chunks = plan.head_chunks;
  args.k_row_words = odd_words((d * k_bits + 7) / 8);
  args.v_row_words = odd_words((d * v_bits + 7) / 8);
  args.partial = partial;
  args.query = c.query;
  args.q_type = q_type;
  args.key_mean = c.key_mean;
  args.rope_inv_freq = c.key_mean != nullptr ? c.rope_inv_freq : nullptr;
  args.q_scale = plan.scale * kLog2e;
  const unsigned pairs = static_cast<unsigned>(c.num_seqs * hkv);
  const bool half = half_norms(c);
  int rc;
  if (d <= 64) rc = launch_split_any<2>(args, pairs, half, stream);
  else if (d <= 128) rc = launch_split_any<4>(args, pairs, half, stream);
  else if (d <= 256) rc = launch_split_any<8>(args, pairs, half, stream);
  else rc = launch_split_any<16>(args, pairs, half, stream);
  if (rc) return rc;
  return rotate_or_merge(false, q_type, c.query, c.rotation, rows, d, 0.f, nullptr, partial, args.group,
                         plan.head_chunks, plan.splits, c.out, stream);
}

}  // namespace generic
}  // namespace tq_cuda
