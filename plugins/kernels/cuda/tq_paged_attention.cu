// TQPagedAttention on the GPU, correctness first: one CTA per (sequence, KV head) serves the
// whole query group of that KV head. Warps take tokens round-robin; lane l owns coordinates
// j = l, l+32, ... Each warp keeps its own online softmax (running max m, sum l, accumulator),
// merged across warps at the end:
//   M = max_w m_w;  L = sum_w l_w e^{m_w - M};  acc = sum_w acc_w e^{m_w - M} / L;  out = acc @ Pi
#include <math.h>

#include "tq_cuda_common.cuh"

namespace tq_cuda {
namespace {

constexpr int kGroupChunk = 8;  // query heads scored per pass over a token's key codes

struct AttnShared {
  float* q_rot;  // [G, D]; reused for the merged accumulator
  float* acc;    // [kWarps, G, D]
  float* m;      // [kWarps, G]
  float* l;      // [kWarps, G]
  float* ck;     // [16]
  float* cv;     // [16]
};

size_t attention_shared_floats(int64_t group, int64_t dim) {
  return static_cast<size_t>(group * dim * (1 + kWarps) + 2 * kWarps * group + 2 * kMaxCodebook);
}

template <typename T>
__global__ void paged_attention_kernel(const T* __restrict__ query, int64_t hq, int64_t hkv, int64_t dim,
                                       const uint8_t* __restrict__ k_codes, const float* __restrict__ k_norms,
                                       const uint8_t* __restrict__ v_codes, const float* __restrict__ v_norms,
                                       int64_t num_blocks, int64_t block_size, const int32_t* __restrict__ block_tables,
                                       int64_t max_blocks, const int32_t* __restrict__ context_lens,
                                       const float* __restrict__ rotation, const float* __restrict__ k_codebook,
                                       const float* __restrict__ v_codebook, int k_bits, int v_bits, float scale,
                                       T* __restrict__ out) {
  extern __shared__ float smem[];
  const int64_t group = hq / hkv;
  AttnShared sh;
  sh.q_rot = smem;
  sh.acc = sh.q_rot + group * dim;
  sh.m = sh.acc + kWarps * group * dim;
  sh.l = sh.m + kWarps * group;
  sh.ck = sh.l + kWarps * group;
  sh.cv = sh.ck + kMaxCodebook;

  const int64_t s = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = query + (s * hq + h * group) * dim;  // the group's query heads are contiguous
  T* o = out + (s * hq + h * group) * dim;

  for (int k = threadIdx.x; k < (1 << k_bits); k += blockDim.x) sh.ck[k] = k_codebook[k];
  for (int k = threadIdx.x; k < (1 << v_bits); k += blockDim.x) sh.cv[k] = v_codebook[k];
  // q_rot = q @ Pi^T, i.e. q_rot[g, j] = sum_i Pi[j, i] q[g, i]; staged through acc as scratch.
  for (int64_t e = threadIdx.x; e < group * dim; e += blockDim.x) sh.acc[e] = to_float(q[e]);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < group * dim; e += blockDim.x) {
    const int64_t g = e / dim, j = e % dim;
    const float* row = rotation + j * dim;
    const float* qg = sh.acc + g * dim;
    float dot = 0.f;
    for (int64_t i = 0; i < dim; ++i) dot = fmaf(row[i], qg[i], dot);
    sh.q_rot[e] = dot;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < kWarps * group * dim; e += blockDim.x) sh.acc[e] = 0.f;
  for (int64_t e = threadIdx.x; e < kWarps * group; e += blockDim.x) {
    sh.m[e] = -INFINITY;
    sh.l[e] = 0.f;
  }
  __syncthreads();

  int64_t ctx = context_lens[s];
  if (ctx > max_blocks * block_size) ctx = max_blocks * block_size;
  if (ctx < 0) ctx = 0;
  const int64_t pk = (dim * k_bits + 7) / 8, pv = (dim * v_bits + 7) / 8;
  float* wacc = sh.acc + warp * group * dim;
  float* wm = sh.m + warp * group;
  float* wl = sh.l + warp * group;

  for (int64_t t = warp; t < ctx; t += kWarps) {
    const int64_t block = block_tables[s * max_blocks + t / block_size];
    if (block < 0 || block >= num_blocks) continue;  // uniform over the warp
    const int64_t cell = (block * block_size + t % block_size) * hkv + h;
    const uint8_t* kc = k_codes + cell * pk;
    const uint8_t* vc = v_codes + cell * pv;
    const float kscale = k_norms[cell] * scale;
    const float vnorm = v_norms[cell];
    for (int64_t g0 = 0; g0 < group; g0 += kGroupChunk) {
      const int ng = static_cast<int>(group - g0 < kGroupChunk ? group - g0 : kGroupChunk);
      float part[kGroupChunk];
#pragma unroll
      for (int g = 0; g < kGroupChunk; ++g) part[g] = 0.f;
      for (int64_t j = lane; j < dim; j += 32) {
        const float c = sh.ck[unpack_code(kc, j, k_bits)];
#pragma unroll
        for (int g = 0; g < kGroupChunk; ++g)
          if (g < ng) part[g] = fmaf(sh.q_rot[(g0 + g) * dim + j], c, part[g]);
      }
#pragma unroll
      for (int g = 0; g < kGroupChunk; ++g) {
        if (g >= ng) break;
        const float score = warp_sum(part[g]) * kscale;
        const float m_old = wm[g0 + g];
        const float m_new = fmaxf(m_old, score);
        const float corr = expf(m_old - m_new);  // 0 on the first token (m_old = -inf)
        const float p = expf(score - m_new);
        float* a = wacc + (g0 + g) * dim;
        for (int64_t j = lane; j < dim; j += 32)
          a[j] = fmaf(p * vnorm, sh.cv[unpack_code(vc, j, v_bits)], a[j] * corr);
        __syncwarp();
        if (lane == 0) {
          wl[g0 + g] = wl[g0 + g] * corr + p;
          wm[g0 + g] = m_new;
        }
        __syncwarp();
      }
    }
  }
  __syncthreads();

  // Merge the warps into q_rot's space (free now): merged[g, j].
  float* merged = sh.q_rot;
  for (int64_t e = threadIdx.x; e < group * dim; e += blockDim.x) {
    const int64_t g = e / dim;
    float big = -INFINITY;
    for (int w = 0; w < kWarps; ++w) big = fmaxf(big, sh.m[w * group + g]);
    float total = 0.f, acc = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float lw = sh.l[w * group + g];
      if (lw == 0.f) continue;  // a warp that saw no token
      const float f = expf(sh.m[w * group + g] - big);
      total += lw * f;
      acc += sh.acc[w * group * dim + e] * f;
    }
    merged[e] = total > 0.f ? acc / total : 0.f;  // context 0 -> zeros
  }
  __syncthreads();
  // out[g, j] = sum_i merged[g, i] Pi[i, j]: coalesced over j.
  for (int64_t e = threadIdx.x; e < group * dim; e += blockDim.x) {
    const int64_t g = e / dim, j = e % dim;
    const float* mg = merged + g * dim;
    float acc = 0.f;
    for (int64_t i = 0; i < dim; ++i) acc = fmaf(mg[i], rotation[i * dim + j], acc);
    o[e] = from_float<T>(acc);
  }
}

}  // namespace
}  // namespace tq_cuda

using namespace tq_cuda;

extern "C" int tq_cuda_paged_attention(const void* query, tq_cuda_dtype q_type, int64_t num_seqs, int64_t num_q_heads,
                                       int64_t num_kv_heads, int64_t head_dim, const uint8_t* k_codes,
                                       const float* k_norms, const uint8_t* v_codes, const float* v_norms,
                                       int64_t num_blocks, int64_t block_size, const int32_t* block_tables,
                                       int64_t max_blocks, const int32_t* context_lens, const float* rotation,
                                       const float* k_codebook, const float* v_codebook, int k_bits, int v_bits,
                                       float scale, void* out, cudaStream_t stream) {
  if (num_seqs < 0 || num_seqs > (int64_t{1} << 31) - 1 || num_kv_heads < 1 || num_kv_heads > 65535 ||
      num_q_heads < num_kv_heads || num_q_heads % num_kv_heads != 0 || head_dim < 1 || num_blocks < 0 ||
      block_size < 1 || max_blocks < 0 || !valid_bits(k_bits) || !valid_bits(v_bits))
    return TQ_CUDA_BAD_ARGUMENT;
  if (num_seqs == 0) return 0;
  if (!(scale > 0.f)) scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  const size_t shared = attention_shared_floats(num_q_heads / num_kv_heads, head_dim) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(num_kv_heads));
  if (q_type == TQ_CUDA_FLOAT16) {
    if (int rc = reserve_shared(paged_attention_kernel<__half>, shared)) return rc;
    paged_attention_kernel<__half><<<grid, kThreads, shared, stream>>>(
        static_cast<const __half*>(query), num_q_heads, num_kv_heads, head_dim, k_codes, k_norms, v_codes, v_norms,
        num_blocks, block_size, block_tables, max_blocks, context_lens, rotation, k_codebook, v_codebook, k_bits,
        v_bits, scale, static_cast<__half*>(out));
  } else if (q_type == TQ_CUDA_FLOAT32) {
    if (int rc = reserve_shared(paged_attention_kernel<float>, shared)) return rc;
    paged_attention_kernel<float><<<grid, kThreads, shared, stream>>>(
        static_cast<const float*>(query), num_q_heads, num_kv_heads, head_dim, k_codes, k_norms, v_codes, v_norms,
        num_blocks, block_size, block_tables, max_blocks, context_lens, rotation, k_codebook, v_codebook, k_bits,
        v_bits, scale, static_cast<float*>(out));
  } else {
    return TQ_CUDA_BAD_ARGUMENT;
  }
  return launch_status();
}
