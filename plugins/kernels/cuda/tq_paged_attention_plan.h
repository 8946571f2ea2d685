// The two decode-attention kernels behind tq_cuda_paged_attention (tq_paged_attention.cu): the
// tensor-core kernel (tq_paged_attention_mma.cuh) for head dims up to 256, the generic
// kernel (tq_paged_attention_generic.cu) for every other. A Plan says how a call is split and
// where its parts sit in the caller's workspace; it depends on the shapes only.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "tq_cuda.h"

namespace tq_cuda {

struct Plan {
  int tensor_cores;    // 1: the mma kernel
  int tiles_per_warp;  // mma: 16-token tiles per warp (split)
  int ctas_per_pair;   // mma: CTAs per (sequence, KV head, chunk of <= 8 query heads)
  int splits;          // generic: splits of the context per (sequence, KV head, head chunk)
  int tokens_per_split;
  int head_chunks;     // generic: query-head chunks of at most 8 heads per KV head
  size_t counters_offset, ml_offset, acc_offset, q_offset, bytes;
};

namespace mma {
// The head dim the kernel runs at: 64/128/256 themselves (the packed layout); other dims up to 256
// on the raw path, padded to a multiple of 16 (at least 32); 0 when the kernel cannot take it.
int64_t kernel_dim(int64_t dim, int k_bits, int v_bits);
bool supported(int64_t hq, int64_t hkv, int64_t dim, int64_t block_size, int k_bits, int v_bits);
// The alignment (bytes) the kernel's cp.async copies need of the codes' base pointers.
int chunk_alignment(int64_t dim, int k_bits, int v_bits);
Plan make_plan(int64_t num_seqs, int64_t hkv, int64_t group, int64_t dim, int64_t max_blocks, int64_t block_size,
               int64_t tokens_per_split, int sms);
int run(const void* query, tq_cuda_dtype q_type, int64_t num_seqs, int64_t hq, int64_t hkv, int64_t dim,
        const uint8_t* k_codes, const float* k_norms, const uint8_t* v_codes, const float* v_norms, int64_t num_blocks,
        int64_t block_size, const int32_t* block_tables, int64_t max_blocks, const int32_t* context_lens,
        const float* rotation, const float* k_codebook, const float* v_codebook, int k_bits, int v_bits, float scale,
        const Plan& plan, void* workspace, void* out, cudaStream_t stream);
}  // namespace mma

namespace generic {
constexpr int64_t kMaxDim = 512;
Plan make_plan(int64_t num_seqs, int64_t hkv, int64_t hq, int64_t dim, int64_t max_blocks, int64_t block_size,
               int64_t tokens_per_split, int sms);
int run(const void* query, tq_cuda_dtype q_type, int64_t num_seqs, int64_t hq, int64_t hkv, int64_t dim,
        const uint8_t* k_codes, const float* k_norms, const uint8_t* v_codes, const float* v_norms, int64_t num_blocks,
        int64_t block_size, const int32_t* block_tables, int64_t max_blocks, const int32_t* context_lens,
        const float* rotation, const float* k_codebook, const float* v_codebook, int k_bits, int v_bits, float scale,
        const Plan& plan, void* workspace, void* out, cudaStream_t stream);
}  // namespace generic

}  // namespace tq_cuda
