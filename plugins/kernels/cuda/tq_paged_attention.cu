// tq_cuda_paged_attention: one entry, two kernels. fp16/bf16 queries with head dims up to 256 run on
// the tensor-core kernel (tq_paged_attention_mma.cu) when the codes' and norms' base pointers have
// the alignment its cp.async copies need; every other call (float32 queries included) runs the
// generic kernel (tq_paged_attention_generic.cu), float32 throughout. Calls with the key mean (key_mean and
// rope_inv_freq) take the tensor cores at head dims 64/128/256 (one more mma per k-step, D/2 sines
// and cosines per tile: tq_paged_attention_mma.cuh); at other head dims the generic kernel.
// The choice and the split depend on the shapes and on whether the key mean is given; the
// workspace size on the shapes only (the larger of the two kernels' needs): a caller that repeats
// a shape plans it once (tq_cuda_paged_attention_plan) and runs the plan.
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

bool shapes_ok(const AttentionCall& c) {
  const int64_t num_seqs = c.num_seqs, hq = c.num_q_heads, hkv = c.num_kv_heads, dim = c.head_dim;
  return num_seqs >= 0 && num_seqs <= (int64_t{1} << 24) && hkv >= 1 && hq >= hkv && hq % hkv == 0 &&
         num_seqs * hkv <= (int64_t{1} << 31) - 1 && dim >= 2 && dim <= generic::kMaxDim && c.block_size >= 1 &&
         c.max_blocks >= 0 && c.max_blocks * c.block_size <= (int64_t{1} << 30) && valid_bits(c.k_bits) &&
         valid_bits(c.v_bits);
}

// float32 queries take the float32 kernel: the tensor-core kernel rounds the rotated query, the
// centroids and the probabilities to fp16 (errors near 5e-4 of the output's scale), which a float32
// model's users and its float32 tolerances do not expect. fp16 and bf16 queries take the tensor cores.
bool tensor_core_shapes(const AttentionCall& c) {
  return c.dtype != TQ_CUDA_FLOAT32 &&
         mma::supported(c.num_q_heads, c.num_kv_heads, c.head_dim, c.block_size, c.k_bits, c.v_bits);
}

// The tensor-core kernel's key-mean term needs the packed layout (head dims 64/128/256).
bool tensor_cores(const AttentionCall& c) {
  return (c.key_mean == nullptr || mma::takes_key_mean(c.head_dim)) && tensor_core_shapes(c);
}

// Both or neither of key_mean and rope_inv_freq; RoPE pairs need an even head dim.
bool key_mean_ok(const AttentionCall& c) {
  if ((c.key_mean == nullptr) != (c.rope_inv_freq == nullptr)) return false;
  return c.key_mean == nullptr || c.head_dim % 2 == 0;
}

// The plan of the tensor-core kernel (mma) or of the generic one.
Plan plan_for(const AttentionCall& c, int64_t tokens_per_split, bool mma, int sms) {
  const int64_t hq = c.num_q_heads, hkv = c.num_kv_heads;
  if (mma)
    return mma::make_plan(c.num_seqs, hkv, hq / hkv, mma::kernel_dim(c.head_dim, c.k_bits, c.v_bits), c.max_blocks,
                          c.block_size, tokens_per_split, sms);
  return generic::make_plan(c.num_seqs, hkv, hq, c.head_dim, c.max_blocks, c.block_size, tokens_per_split, sms);
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

extern "C" int tq_cuda_paged_attention_path(const tq_paged_attention_call* call) {
  return call != nullptr && tensor_cores(*call) ? 1 : 0;
}

extern "C" size_t tq_cuda_paged_attention_workspace(const tq_paged_attention_call* call) {
  const int64_t tokens_per_split = 0;
  if (call == nullptr || !shapes_ok(*call) || call->num_seqs == 0) return 0;
  // the larger of the two kernels' needs: a call may take the generic kernel on misaligned
  // codes or with the key mean, which the size does not depend on
  const int sms = num_sms();
  return std::max(plan_for(*call, tokens_per_split, tensor_core_shapes(*call), sms).workspace_bytes,
                  plan_for(*call, tokens_per_split, false, sms).workspace_bytes);
}

extern "C" int tq_cuda_paged_attention_plan(const tq_paged_attention_call* call, int64_t tokens_per_split,
                                            tq_cuda_paged_attention_plan_t* plan) {
  if (call == nullptr || plan == nullptr) return TQ_CUDA_BAD_ARGUMENT;
  const AttentionCall& c = *call;
  if (!shapes_ok(c) || !key_mean_ok(c) || c.num_blocks < 0 || c.num_blocks > (int64_t{1} << 31) - 1 ||
      tokens_per_split < 0 || !valid_norm_dtype(c.norm_dtype) ||
      (c.dtype != TQ_CUDA_FLOAT32 && c.dtype != TQ_CUDA_FLOAT16 && c.dtype != TQ_CUDA_BFLOAT16))
    return TQ_CUDA_BAD_ARGUMENT;
  *plan = Plan{};
  if (c.num_seqs == 0) return 0;  // run() launches nothing
  float scale = c.scale;
  if (!(scale >= 0.f) || !isfinite(scale)) return TQ_CUDA_BAD_ARGUMENT;
  if (scale == 0.f) scale = 1.0f / sqrtf(static_cast<float>(c.head_dim));
  const bool fast = tensor_cores(c);
  const uintptr_t align = fast ? static_cast<uintptr_t>(mma::chunk_alignment(c.head_dim, c.k_bits, c.v_bits)) : 1;
  *plan = plan_for(c, tokens_per_split, fast && cache_aligned(c, align), num_sms());
  plan->code_alignment = static_cast<int32_t>(align);
  plan->scale = scale;
  return 0;
}

extern "C" int tq_cuda_paged_attention_run(const tq_cuda_paged_attention_plan_t* plan,
                                           const tq_paged_attention_call* call) {
  if (call->num_seqs == 0) return 0;
  return plan->tensor_cores ? mma::run(*call, *plan) : generic::run(*call, *plan);
}

extern "C" int tq_cuda_paged_attention(const tq_paged_attention_call* call) {
  Plan plan;
  if (int rc = tq_cuda_paged_attention_plan(call, 0, &plan)) return rc;
  if (plan.workspace_bytes > 0 && (call->workspace == nullptr || call->workspace_bytes < plan.workspace_bytes))
    return TQ_CUDA_BAD_ARGUMENT;
  return tq_cuda_paged_attention_run(&plan, call);
}
