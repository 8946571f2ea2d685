/* TurboQuant CUDA kernels behind a C launcher API on raw device pointers.
 *
 * One launcher per op, tq_cuda_<stem>(const tq_<stem>_call*), its argument the op's generated
 * call struct (tq_calls.h, from tq_deploy/ops.py), called alike by the PyTorch path (libtq_deploy_cuda.so, tq_deploy.cuda),
 * the ONNX Runtime CUDA EP kernels (plugins/ort) and the TensorRT plugins (plugins/trt): no
 * TensorRT or ONNX Runtime type appears here. Every pointer is a device pointer; every launcher
 * only enqueues work on `stream` (never allocates, never synchronizes) and returns
 * cudaGetLastError() of its launches (0 = success), or TQ_CUDA_BAD_ARGUMENT when a size argument
 * is out of range or a dtype / norm_dtype is not one the op takes (nothing is launched then).
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
 *            with key_mean mu [Hkv, D] and rope_inv_freq w [D/2] (both or neither, D even), the
 *            token at position t >= 1 of its sequence adds q . R_t mu to s_t before the scale:
 *            sum_j A_j cos(t w_j) + B_j sin(t w_j), A_j = q_j mu_j + q_j' mu_j',
 *            B_j = q_j' mu_j - q_j mu_j', j' = j + D/2, q unrotated, angle the float32 t * w_j
 *            (the tensor-core kernel at head dims 64/128/256, else the generic kernel:
 *            tq_cuda_paged_attention_path)
 *
 * Layouts: rotation [D, D] row-major float32 (y = rotation @ x); codebooks [2**bits] ascending
 * float32; paged cache codes [N, B, Hkv, P] uint8 and norms [N, B, Hkv] float32 or float16 (the
 * call's norm_dtype, keys and values alike; a float16 norm is the float32 one rounded to nearest
 * even when stored, read back exactly, the codes chosen with the float32 norm) with
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

#include "tq_calls.h"
#include "tq_op_list.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TQ_CUDA_BAD_ARGUMENT 10001

/* The kernels take float32, float16 and bfloat16 T tensors (the dtype field of a call) and float32 or
 * float16 paged-cache norms (norm_dtype, TN). */
typedef tq_dtype tq_cuda_dtype;
#define TQ_CUDA_FLOAT32 TQ_FLOAT32
#define TQ_CUDA_FLOAT16 TQ_FLOAT16
#define TQ_CUDA_BFLOAT16 TQ_BFLOAT16

/* Bytes of one packed vector: ceil(dim * bits / 8). */
static inline int64_t tq_cuda_packed_size(int64_t dim, int bits) { return (dim * bits + 7) / 8; }

/* JSON describing the build: CUDA version, architectures. */
const char* tq_cuda_build_info(void);
/* A launcher's return code in words. */
const char* tq_cuda_error_string(int code);

/* One launcher per op of the contract (tq_op_list.h), defined in tq_<stem>.cu:
 *   size_t tq_cuda_<stem>_workspace(const tq_<stem>_call* call)  device scratch the call needs, from
 *                                                               its sizes alone (pointers may be null)
 *   int tq_cuda_<stem>(const tq_<stem>_call* call)               the launch
 * Each file's opening comment says what its op computes (the contract: tq_deploy/ops.py). */
#define TQ_CUDA_DECLARE_LAUNCHER(stem, Pascal, float_types, norm_types)                 \
  size_t tq_cuda_##stem##_workspace(const tq_##stem##_call* call); \
  int tq_cuda_##stem(const tq_##stem##_call* call);
TQ_FOR_EACH_OP(TQ_CUDA_DECLARE_LAUNCHER)
#undef TQ_CUDA_DECLARE_LAUNCHER

/* Decode attention, planned once per shape and run many times (FlashInfer style).
 *
 * tq_cuda_paged_attention_plan checks the call's sizes, attributes, dtype and norm_dtype, resolves
 * scale 0 to 1/sqrt(D), picks the kernel and the split-K (tokens_per_split = 0: from the shapes and
 * the device's SM count) and sizes the workspace. It reads the call's sizes, attributes, dtype,
 * norm_dtype, the alignment of k_codes, v_codes, k_norms and v_norms and whether key_mean and
 * rope_inv_freq are null, nothing else (one of them null and not the other, or key_mean with an odd
 * head dim: TQ_CUDA_BAD_ARGUMENT). The plan holds for every call with the same sizes, attributes,
 * dtype and norm_dtype whose codes keep that alignment (code_alignment bytes) and whose norms keep
 * min(code_alignment, 4) bytes (null pointers count as aligned), and that gives the key mean exactly
 * when the planned call did (the plan itself does not depend on norm_dtype: run() reads it from the
 * call).
 *
 * tq_cuda_paged_attention_run launches a planned call and checks nothing: the call must match
 * its plan and carry a workspace of at least plan->workspace_bytes.
 *
 * tq_cuda_paged_attention does both (and checks the workspace size): for callers that do not
 * repeat a shape. tq_cuda_paged_attention_workspace sizes a workspace for either kernel and the
 * library's split (tokens_per_split 0), from the sizes alone, the key mean's pointers included
 * (the size only grows with num_seqs and max_blocks, so one sized for the largest shapes serves
 * every smaller call). */
typedef struct {
  int32_t tensor_cores;     /* 1: the tensor-core kernel (tq_paged_attention_mma.cu), 0: the generic one */
  int32_t tiles_per_warp;   /* tensor cores: 16-token tiles per warp (split) */
  int32_t ctas_per_pair;    /* tensor cores: CTAs per (sequence, KV head, chunk of <= 8 query heads) */
  int32_t splits;           /* generic: splits of the context per (sequence, KV head, head chunk) */
  int32_t tokens_per_split; /* generic */
  int32_t head_chunks;      /* generic: query-head chunks of at most 8 heads per KV head */
  int32_t code_alignment;   /* bytes k_codes and v_codes were aligned to when planned */
  float scale;              /* the softmax scale, 0 resolved */
  size_t counters_offset, ml_offset, acc_offset, q_offset; /* parts of the workspace */
  size_t workspace_bytes;
} tq_cuda_paged_attention_plan_t;
int tq_cuda_paged_attention_plan(const tq_paged_attention_call* call, int64_t tokens_per_split,
                                 tq_cuda_paged_attention_plan_t* plan);
int tq_cuda_paged_attention_run(const tq_cuda_paged_attention_plan_t* plan, const tq_paged_attention_call* call);

/* 1 when the call takes the tensor-core kernel (fp16/bf16 queries; head_dim up to 256 -- 64/128/256
 * on the packed layout, other dims with codes widened to 8 bits -- any bit widths, block size and
 * number of query heads per KV head; the key mean at 64/128/256 only), 0 for the generic kernel
 * (float32 queries, larger head dims, key_mean at other head dims). Reads num_q_heads,
 * num_kv_heads, head_dim, block_size, k_bits, v_bits, dtype, key_mean. */
int tq_cuda_paged_attention_path(const tq_paged_attention_call* call);

#ifdef __cplusplus
}

/* The launchers as one overload set, for glue that is generic over the ops. */
namespace tq_cuda {
#define TQ_CUDA_OVERLOAD(stem, Pascal, float_types, norm_types)                                                       \
  inline size_t workspace(const tq_##stem##_call* call) { return tq_cuda_##stem##_workspace(call); } \
  inline int launch(const tq_##stem##_call* call) { return tq_cuda_##stem(call); }
TQ_FOR_EACH_OP(TQ_CUDA_OVERLOAD)
#undef TQ_CUDA_OVERLOAD
}  // namespace tq_cuda
#endif

#endif /* TQ_CUDA_H_ */
