// tq_cuda_paged_attention: one entry, two kernels. Head dims up to 256 run on the tensor-core
// kernel (tq_paged_attention_mma.cu) when the codes' base pointers have the alignment its cp.async
// copies need; every other call runs the generic kernel (tq_paged_attention_generic.cu).
// The choice and the split depend on the shapes only, so the workspace size does too.
#include <math.h>

#include <algorithm>

#include "tq_cuda_common.cuh"
#include "tq_paged_attention_plan.h"

namespace tq_cuda {

int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 132;
  return sms;
}

namespace {

bool shapes_ok(int64_t num_seqs, int64_t hq, int64_t hkv, int64_t dim, int64_t max_blocks, int64_t block_size,
               int k_bits, int v_bits) {
  return num_seqs >= 0 && num_seqs <= (int64_t{1} << 24) && hkv >= 1 && hq >= hkv && hq % hkv == 0 &&
         num_seqs * hkv <= (int64_t{1} << 31) - 1 && dim >= 2 && dim <= generic::kMaxDim && block_size >= 1 &&
         max_blocks >= 0 && max_blocks * block_size <= (int64_t{1} << 30) && valid_bits(k_bits) && valid_bits(v_bits);
}

Plan plan_for(int64_t num_seqs, int64_t hq, int64_t hkv, int64_t dim, int64_t max_blocks, int64_t block_size,
              int k_bits, int v_bits, int64_t tokens_per_split, bool aligned) {
  if (aligned && mma::supported(hq, hkv, dim, block_size, k_bits, v_bits))
    return mma::make_plan(num_seqs, hkv, hq / hkv, mma::kernel_dim(dim, k_bits, v_bits), max_blocks, block_size,
                          tokens_per_split, num_sms());
  return generic::make_plan(num_seqs, hkv, hq, dim, max_blocks, block_size, tokens_per_split, num_sms());
}

}  // namespace
}  // namespace tq_cuda

using namespace tq_cuda;

#ifndef TQ_CUDA_ARCHITECTURES
#define TQ_CUDA_ARCHITECTURES "unknown"
#endif
#define TQ_STR_(x) #x
#define TQ_STR(x) TQ_STR_(x)

extern "C" const char* tq_cuda_build_info(void) {
  return "{\"cuda\": \"" TQ_STR(__CUDACC_VER_MAJOR__) "." TQ_STR(__CUDACC_VER_MINOR__)
         "\", \"architectures\": \"" TQ_CUDA_ARCHITECTURES "\", \"bits\": \"1-8\", "
         "\"tensor_core_attention\": \"head dim <= 256\"}";
}

extern "C" const char* tq_cuda_error_string(int code) {
  if (code == TQ_CUDA_BAD_ARGUMENT) return "bad argument (a size outside the kernel's limits)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

extern "C" int tq_cuda_paged_attention_path(int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                            int64_t block_size, int k_bits, int v_bits) {
  return mma::supported(num_q_heads, num_kv_heads, head_dim, block_size, k_bits, v_bits) ? 1 : 0;
}

extern "C" size_t tq_cuda_paged_attention_workspace(int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                                                    int64_t head_dim, int64_t max_blocks, int64_t block_size,
                                                    int k_bits, int v_bits, int64_t tokens_per_split) {
  if (!shapes_ok(num_seqs, num_q_heads, num_kv_heads, head_dim, max_blocks, block_size, k_bits, v_bits) ||
      tokens_per_split < 0 || num_seqs == 0)
    return 0;
  // the larger of the two kernels' needs: the call may fall back to the generic kernel on
  // misaligned codes, which the size cannot know
  const Plan fast = plan_for(num_seqs, num_q_heads, num_kv_heads, head_dim, max_blocks, block_size, k_bits, v_bits,
                             tokens_per_split, true);
  const Plan slow = plan_for(num_seqs, num_q_heads, num_kv_heads, head_dim, max_blocks, block_size, k_bits, v_bits,
                             tokens_per_split, false);
  return std::max(fast.bytes, slow.bytes);
}

extern "C" int tq_cuda_paged_attention(const void* query, tq_cuda_dtype q_type, int64_t num_seqs,
                                       int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                       const uint8_t* k_codes, const float* k_norms, const uint8_t* v_codes,
                                       const float* v_norms, int64_t num_blocks, int64_t block_size,
                                       const int32_t* block_tables, int64_t max_blocks, const int32_t* context_lens,
                                       const float* rotation, const float* k_codebook, const float* v_codebook,
                                       int k_bits, int v_bits, float scale, int64_t tokens_per_split, void* workspace,
                                       size_t workspace_bytes, void* out, cudaStream_t stream) {
  if (!shapes_ok(num_seqs, num_q_heads, num_kv_heads, head_dim, max_blocks, block_size, k_bits, v_bits) ||
      num_blocks < 0 || num_blocks > (int64_t{1} << 31) - 1 || tokens_per_split < 0 ||
      (q_type != TQ_CUDA_FLOAT32 && q_type != TQ_CUDA_FLOAT16 && q_type != TQ_CUDA_BFLOAT16))
    return TQ_CUDA_BAD_ARGUMENT;
  if (num_seqs == 0) return 0;
  if (!(scale >= 0.f) || !isfinite(scale)) return TQ_CUDA_BAD_ARGUMENT;
  if (scale == 0.f) scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  bool aligned = true;
  if (mma::supported(num_q_heads, num_kv_heads, head_dim, block_size, k_bits, v_bits)) {
    const uintptr_t align = static_cast<uintptr_t>(mma::chunk_alignment(head_dim, k_bits, v_bits));
    aligned = reinterpret_cast<uintptr_t>(k_codes) % align == 0 && reinterpret_cast<uintptr_t>(v_codes) % align == 0;
  }
  const Plan plan = plan_for(num_seqs, num_q_heads, num_kv_heads, head_dim, max_blocks, block_size, k_bits, v_bits,
                             tokens_per_split, aligned);
  if (plan.bytes > 0 && (workspace == nullptr || workspace_bytes < plan.bytes)) return TQ_CUDA_BAD_ARGUMENT;
  if (plan.tensor_cores)
    return mma::run(query, q_type, num_seqs, num_q_heads, num_kv_heads, head_dim, k_codes, k_norms, v_codes, v_norms,
                    num_blocks, block_size, block_tables, max_blocks, context_lens, rotation, k_codebook, v_codebook,
                    k_bits, v_bits, scale, plan, workspace, out, stream);
  return generic::run(query, q_type, num_seqs, num_q_heads, num_kv_heads, head_dim, k_codes, k_norms, v_codes,
                      v_norms, num_blocks, block_size, block_tables, max_blocks, context_lens, rotation, k_codebook,
                      v_codebook, k_bits, v_bits, scale, plan, workspace, out, stream);
}

extern "C" int tq_cuda_paged_attention_run(const tq_cuda_paged_attention_call* c) {
  if (c == nullptr) return TQ_CUDA_BAD_ARGUMENT;
  return tq_cuda_paged_attention(c->query, static_cast<tq_cuda_dtype>(c->q_type), c->num_seqs, c->num_q_heads,
                                 c->num_kv_heads, c->head_dim, c->k_codes, c->k_norms, c->v_codes, c->v_norms,
                                 c->num_blocks, c->block_size, c->block_tables, c->max_blocks, c->context_lens,
                                 c->rotation, c->k_codebook, c->v_codebook, c->k_bits, c->v_bits, c->scale,
                                 c->tokens_per_split, c->workspace, c->workspace_bytes, c->out, c->stream);
}
