/* TurboQuant CUDA kernels behind a C launcher API on raw device pointers.
 *
 * One launcher per op, called alike by the PyTorch path (libtq_deploy_cuda.so, tq_deploy.cuda),
 * the ONNX Runtime CUDA EP kernels (plugins/ort) and the TensorRT plugins (plugins/trt): no
 * TensorRT or ONNX Runtime type appears here. Every pointer is a device pointer; every launcher
 * only enqueues work on `stream` (never allocates, never synchronizes) and returns
 * cudaGetLastError() of its launches (0 = success), or TQ_CUDA_BAD_ARGUMENT when a size argument
 * is out of range (nothing is launched then).
 *
 * Math (identical to tq_deploy.reference, float32 compute), bits 1..8:
 *   encode:  norm = ||x||_2 (computed on x scaled by a power of two: finite for 1e20s, nonzero for
 *            1e-30s);  y = (Pi x) / norm  (y = 0 where norm == 0);
 *            code_j = #{ k : b_k < y_j },  b_k = (c_k + c_{k+1}) / 2;
 *            codes packed as a little-endian bit stream, code i at bits [i*bits, (i+1)*bits).
 *   decode:  x_hat = norm * Pi^T c[code]
 *   paged attention (sequence s, query head h, KV head h / (Hq/Hkv)):
 *            q_rot = Pi q;  s_t = k_norm_t <q_rot, c_k[idx_k_t]> * scale;
 *            p = softmax(s) over t < context_lens[s];  out = Pi^T sum_t p_t v_norm_t c_v[idx_v_t]
 *            (a context of 0 tokens gives zeros; a NaN or overflowing score gives NaN)
 *
 * Layouts: rotation [D, D] row-major float32 (y = rotation @ x); codebooks [2**bits] ascending
 * float32; paged cache codes [N, B, Hkv, P] uint8 and norms [N, B, Hkv] float32 with
 * P = ceil(D * bits / 8); slot = block * B + offset.
 *
 * Device-side data the host cannot see without a synchronization (slots, block-table entries,
 * context lengths) is never read out of bounds and never raises: a slot outside [0, N*B) skips
 * its token, a block-table entry outside [0, N) skips that block's tokens, a context length is
 * clamped to [0, M*B]. Callers that need errors validate on the host first (as the ONNX Runtime
 * CPU kernels do). docs/ops.md ("Bad input") states the rule for every backend.
 */
#ifndef TQ_CUDA_H_
#define TQ_CUDA_H_

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TQ_CUDA_BAD_ARGUMENT 10001

typedef enum { TQ_CUDA_FLOAT32 = 0, TQ_CUDA_FLOAT16 = 1, TQ_CUDA_BFLOAT16 = 2 } tq_cuda_dtype;

/* Bytes of one packed vector: ceil(dim * bits / 8). */
static inline int64_t tq_cuda_packed_size(int64_t dim, int bits) { return (dim * bits + 7) / 8; }

/* JSON describing the build: CUDA version, architectures. */
const char* tq_cuda_build_info(void);
/* A launcher's return code in words. */
const char* tq_cuda_error_string(int code);

/* x [rows, dim] (float32/float16/bfloat16) -> codes [rows, P] uint8, norms [rows] float32. */
int tq_cuda_encode(const void* x, tq_cuda_dtype x_type, int64_t rows, int64_t dim, const float* rotation,
                   const float* codebook, int bits, uint8_t* codes, float* norms, cudaStream_t stream);

/* codes [rows, P], norms [rows] -> x_hat [rows, dim] float32. */
int tq_cuda_decode(const uint8_t* codes, const float* norms, int64_t rows, int64_t dim, const float* rotation,
                   const float* codebook, int bits, float* x_hat, cudaStream_t stream);

/* key/value [T, Hkv, D] (float32/float16/bfloat16) encoded into the paged cache, in place.
 * slot_mapping [T] int64; negative slots skip the token; when several tokens name one slot the
 * last of them wins (as in the reference). The caller provides a device workspace of
 * tq_cuda_cache_update_workspace(T) bytes (0 for up to 32 tokens, which are checked inline) for
 * that bookkeeping. */
size_t tq_cuda_cache_update_workspace(int64_t num_tokens);
int tq_cuda_cache_update(const void* key, const void* value, tq_cuda_dtype kv_type, const int64_t* slot_mapping,
                         int64_t num_tokens, int64_t num_kv_heads, int64_t head_dim, uint8_t* k_codes,
                         float* k_norms, uint8_t* v_codes, float* v_norms, int64_t num_blocks, int64_t block_size,
                         const float* rotation, const float* k_codebook, const float* v_codebook, int k_bits,
                         int v_bits, void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* Decode attention. The caller provides a device workspace of at least
 * tq_cuda_paged_attention_workspace(...) bytes (the same shapes and tokens_per_split as the call;
 * the size only grows with num_seqs and max_blocks, so a workspace sized for the largest shapes
 * serves every smaller call). query [S, Hq, D] (float32/float16/bfloat16) -> out [S, Hq, D] of the
 * same dtype; block_tables [S, M] int32, context_lens [S] int32; scale <= 0 means 1/sqrt(D).
 * tokens_per_split = 0 picks the split-K from the shapes and the device's SM count.
 * Shapes the tensor-core kernel takes (tq_cuda_paged_attention_path == 1) run on it; every other
 * shape runs the generic kernel. */
size_t tq_cuda_paged_attention_workspace(int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                                         int64_t head_dim, int64_t max_blocks, int64_t block_size, int k_bits,
                                         int v_bits, int64_t tokens_per_split);
int tq_cuda_paged_attention(const void* query, tq_cuda_dtype q_type, int64_t num_seqs, int64_t num_q_heads,
                            int64_t num_kv_heads, int64_t head_dim, const uint8_t* k_codes, const float* k_norms,
                            const uint8_t* v_codes, const float* v_norms, int64_t num_blocks, int64_t block_size,
                            const int32_t* block_tables, int64_t max_blocks, const int32_t* context_lens,
                            const float* rotation, const float* k_codebook, const float* v_codebook, int k_bits,
                            int v_bits, float scale, int64_t tokens_per_split, void* workspace,
                            size_t workspace_bytes, void* out, cudaStream_t stream);
/* The same call with its arguments in one struct: a caller that repeats a call (a decode loop
 * through a language binding) fills it once and changes only the per-step fields. */
typedef struct {
  const void* query;
  int32_t q_type; /* tq_cuda_dtype */
  int32_t k_bits, v_bits;
  float scale;
  int64_t num_seqs, num_q_heads, num_kv_heads, head_dim;
  const uint8_t* k_codes;
  const float* k_norms;
  const uint8_t* v_codes;
  const float* v_norms;
  int64_t num_blocks, block_size;
  const int32_t* block_tables;
  int64_t max_blocks;
  const int32_t* context_lens;
  const float* rotation;
  const float* k_codebook;
  const float* v_codebook;
  int64_t tokens_per_split;
  void* workspace;
  size_t workspace_bytes;
  void* out;
  cudaStream_t stream;
} tq_cuda_paged_attention_call;
int tq_cuda_paged_attention_run(const tq_cuda_paged_attention_call* call);

/* 1 when these shapes take the tensor-core kernel (head_dim up to 256 -- 64/128/256 on the packed
 * layout, other dims with codes widened to 8 bits -- any bit widths, block size and number of query
 * heads per KV head), 0 for the generic kernel (larger head dims). */
int tq_cuda_paged_attention_path(int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                 int k_bits, int v_bits);

#ifdef __cplusplus
}
#endif

#endif /* TQ_CUDA_H_ */
