// The two decode-attention kernels behind tq_cuda_paged_attention (tq_paged_attention.cu): the
// tensor-core kernel (tq_paged_attention_mma.cuh) for head dims up to 256, the generic
// kernel (tq_paged_attention_generic.cu) for every other. A Plan (tq_cuda_paged_attention_plan
// of tq_cuda.h) says which runs, how a call is split and where its parts sit in the caller's
// workspace; it depends on the shapes only. run() takes the call and its plan and checks nothing.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "tq_cuda.h"

namespace tq_cuda {

using Plan = tq_cuda_paged_attention_plan_t;
using AttentionCall = tq_paged_attention_call;

// The paged cache and tables as both kernels' arguments hold them (in this order: their
// arguments' layout, see mma::SplitArgs). The norms are float32 or float16, half_norms(call): a
// flag in the tensor-core kernel's arguments (held last), a template parameter of the generic one.
struct PagedCacheArgs {
  const uint8_t* k_codes;
  const void* k_norms;
  const uint8_t* v_codes;
  const void* v_norms;
  const int32_t* block_tables;
  const int32_t* context_lens;
};
inline PagedCacheArgs cache_args(const AttentionCall& c) {
  return PagedCacheArgs{c.k_codes, c.k_norms, c.v_codes, c.v_norms, c.block_tables, c.context_lens};
}
inline bool half_norms(const AttentionCall& c) { return c.norm_dtype == TQ_FLOAT16; }

// Whether the cache's base pointers suit the tensor-core kernel's cp.async copies: the codes to
// `alignment` bytes (mma::chunk_alignment), the norms to at most 4 (copied as 4-byte words).
// Planning asks it; tq_cuda::AttentionPlans re-plans a call whose answer differs from its plan's.
inline bool cache_aligned(const AttentionCall& c, uintptr_t alignment) {
  const uintptr_t a = alignment > 0 ? alignment : 1, n = a < 4 ? a : 4;
  return reinterpret_cast<uintptr_t>(c.k_codes) % a == 0 && reinterpret_cast<uintptr_t>(c.v_codes) % a == 0 &&
         reinterpret_cast<uintptr_t>(c.k_norms) % n == 0 && reinterpret_cast<uintptr_t>(c.v_norms) % n == 0;
}

// The sizes both kernels' arguments hold as ints (checked to fit when planned).
template <typename Args>
void set_sizes(Args& a, const AttentionCall& c) {
  a.num_kv_heads = static_cast<int>(c.num_kv_heads);
  a.num_q_heads = static_cast<int>(c.num_q_heads);
  a.group = static_cast<int>(c.num_q_heads / c.num_kv_heads);
  a.block_size = static_cast<int>(c.block_size);
  a.max_blocks = static_cast<int>(c.max_blocks);
  a.num_blocks = static_cast<int>(c.num_blocks);
}

namespace mma {
// The head dim the kernel runs at: 64/128/256 themselves (the packed layout); other dims up to 256
// on the raw path, padded to a multiple of 16 (at least 32); 0 when the kernel cannot take it.
int64_t kernel_dim(int64_t dim, int k_bits, int v_bits);
bool supported(int64_t hq, int64_t hkv, int64_t dim, int64_t block_size, int k_bits, int v_bits);
// whether the kernel has the key mean's term at this head dim (the packed layout: 64, 128, 256)
bool takes_key_mean(int64_t dim);
// The alignment (bytes) the kernel's cp.async copies need of the codes' base pointers.
int chunk_alignment(int64_t dim, int k_bits, int v_bits);
Plan make_plan(int64_t num_seqs, int64_t hkv, int64_t group, int64_t dim, int64_t max_blocks, int64_t block_size,
               int64_t tokens_per_split, int sms);
int run(const AttentionCall& call, const Plan& plan);
}  // namespace mma

namespace generic {
constexpr int64_t kMaxDim = 512;
Plan make_plan(int64_t num_seqs, int64_t hkv, int64_t hq, int64_t dim, int64_t max_blocks, int64_t block_size,
               int64_t tokens_per_split, int sms);
int run(const AttentionCall& call, const Plan& plan);
}  // namespace generic

}  // namespace tq_cuda
