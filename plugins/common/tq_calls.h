/* GENERATED from tq_deploy/ops.py by `python -m tq_deploy.export.op_tables --native plugins/common`: do not edit.
 * tests/test_export.py fails when it drifts from the specs; tq_deploy.cuda builds its ctypes mirror
 * from the same field list (tq_deploy/abi.py).
 *
 * One struct per op of tq_deploy/ops.py, taken by every native kernel of the op (CPU: tq_kernels.h,
 * CUDA: tq_cuda.h): the inputs and outputs in the contract's order (host pointers for the CPU kernels,
 * device pointers for the CUDA ones; shapes: docs/ops.md), the sizes of the symbolic dimensions
 * (rows: the product of the leading "..." dims; S, T, Hq, Hkv, D, N, B, M: num_seqs, num_tokens,
 * num_q_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks), the attributes, the
 * float type of the T tensors (dtype) and of the cache norms (norm_dtype, TN), and the launch:
 * device workspace and CUDA stream (the CPU kernels ignore them).
 * An in-place output (<x>_out) is the buffer the kernel writes; the caller makes it hold <x> first.
 * An optional input (docs/ops.md) the node leaves out is a null pointer.
 */
#ifndef TQ_CALLS_H_
#define TQ_CALLS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The float type of an op's T tensors, and of the paged cache's norms (TN). */
typedef enum { TQ_FLOAT32 = 0, TQ_FLOAT16 = 1, TQ_BFLOAT16 = 2 } tq_dtype;

/* TQEncode */
typedef struct tq_encode_call {
  /* inputs */ const void* x; const float* rotation; const float* codebook;
  /* outputs */ uint8_t* codes; float* norms;
  /* sizes */ int64_t rows; int64_t head_dim;
  /* attributes */ int32_t bits;
  /* tq_dtype of T */ int32_t dtype;
  /* launch */ void* workspace; size_t workspace_bytes; void* stream;
} tq_encode_call;

/* TQDecode */
typedef struct tq_decode_call {
  /* inputs */ const uint8_t* codes; const float* norms; const float* rotation; const float* codebook;
  /* outputs */ float* x_hat;
  /* sizes */ int64_t rows; int64_t head_dim;
  /* attributes */ int32_t bits;
  /* launch */ void* workspace; size_t workspace_bytes; void* stream;
} tq_decode_call;

/* TQCacheUpdate */
typedef struct tq_cache_update_call {
  /* inputs */ const void* key; const void* value; const int64_t* slot_mapping; const uint8_t* k_codes; const void* k_norms; const uint8_t* v_codes; const void* v_norms; const float* rotation; const float* k_codebook; const float* v_codebook;
  /* outputs */ uint8_t* k_codes_out; void* k_norms_out; uint8_t* v_codes_out; void* v_norms_out;
  /* sizes */ int64_t num_tokens; int64_t num_kv_heads; int64_t head_dim; int64_t num_blocks; int64_t block_size;
  /* attributes */ int32_t k_bits; int32_t v_bits;
  /* tq_dtype of T */ int32_t dtype;
  /* tq_dtype of TN */ int32_t norm_dtype;
  /* launch */ void* workspace; size_t workspace_bytes; void* stream;
} tq_cache_update_call;

/* TQPagedAttention */
typedef struct tq_paged_attention_call {
  /* inputs */ const void* query; const uint8_t* k_codes; const void* k_norms; const uint8_t* v_codes; const void* v_norms; const int32_t* block_tables; const int32_t* context_lens; const float* rotation; const float* k_codebook; const float* v_codebook; const float* key_mean; const float* rope_inv_freq;
  /* outputs */ void* out;
  /* sizes */ int64_t num_seqs; int64_t num_q_heads; int64_t head_dim; int64_t num_blocks; int64_t block_size; int64_t num_kv_heads; int64_t max_blocks;
  /* attributes */ int32_t k_bits; int32_t v_bits; float scale;
  /* tq_dtype of T */ int32_t dtype;
  /* tq_dtype of TN */ int32_t norm_dtype;
  /* launch */ void* workspace; size_t workspace_bytes; void* stream;
} tq_paged_attention_call;

/* TQPagedPrefill */
typedef struct tq_paged_prefill_call {
  /* inputs */ const void* query; const uint8_t* k_codes; const void* k_norms; const uint8_t* v_codes; const void* v_norms; const int32_t* block_tables; const int32_t* context_lens; const int32_t* query_start; const float* rotation; const float* k_codebook; const float* v_codebook; const float* key_mean; const float* rope_inv_freq;
  /* outputs */ void* out;
  /* sizes */ int64_t num_tokens; int64_t num_q_heads; int64_t head_dim; int64_t num_blocks; int64_t block_size; int64_t num_kv_heads; int64_t num_seqs; int64_t max_blocks;
  /* attributes */ int32_t k_bits; int32_t v_bits; float scale;
  /* tq_dtype of T */ int32_t dtype;
  /* tq_dtype of TN */ int32_t norm_dtype;
  /* launch */ void* workspace; size_t workspace_bytes; void* stream;
} tq_paged_prefill_call;

#ifdef __cplusplus
}
#endif

#endif /* TQ_CALLS_H_ */
