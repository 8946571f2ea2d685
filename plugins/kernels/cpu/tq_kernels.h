// TurboQuant CPU kernels on raw pointers: no ONNX Runtime / TensorRT dependency,
// so every runtime's glue (plugins/ort, plugins/trt) calls the same code.
//
// Math (identical to tq_deploy.reference, float32 compute), bits 1..8:
//   encode:  norm = ||x||_2, computed on x scaled by a power of two (finite for 1e20s, nonzero for
//            1e-30s);  y = (Pi x) / norm (y = 0 where norm == 0);
//            code_j = #{ boundaries b_k : b_k < y_j }, b_k = (c_k + c_{k+1}) / 2;
//            codes packed as a little-endian bit stream (code i at bits [i*bits, (i+1)*bits)).
//   decode:  x_hat = norm * Pi^T c[code]
//   paged attention (per sequence s, query head h, KV head h / (Hq/Hkv)):
//            q_rot = Pi q;  s_t = k_norm_t <q_rot, c_k[idx_k_t]> * scale;
//            p = softmax(s);  out = Pi^T sum_t p_t v_norm_t c_v[idx_v_t]
//            (a context of 0 tokens gives zeros; a NaN or overflowing score gives NaN, never zeros)
//   paged prefill: the same for query rows [query_start[s], query_start[s+1]) of sequence s, row j
//            of its n rows at position p = context_lens[s] - n + j attending to tokens 0..p only
//   key mean (both attention ops, when call.key_mean is not null): s_t += scale * q . R_t mu for
//            t >= 1 (tq_deploy/ops.py; mu = key_mean of the KV head, R_t: RoPE by rope_inv_freq)
//
// Callers validate shapes and data first (tq_checks.h); these functions trust their
// arguments. Work is spread over threads through a caller-supplied Parallel.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tq_calls.h"
#include "tq_half.h"
#include "tq_op_list.h"

namespace tq {

enum class DType { kFloat32, kFloat16 };

// Runs task(task_ctx, i) for every i in [0, total), possibly concurrently.
// The runtime supplies `run` (e.g. ONNX Runtime's intra-op thread pool); with run == nullptr
// the items run serially on the calling thread.
struct Parallel {
  using Task = void (*)(void* task_ctx, size_t index);
  using RunFn = void (*)(void* runner, Task task, size_t total, void* task_ctx);
  RunFn run = nullptr;
  void* runner = nullptr;

  void for_each(size_t total, Task task, void* task_ctx) const;
};

// A Parallel backed by std::thread (for hosts without a thread pool); threads <= 0 means
// std::thread::hardware_concurrency(). The returned object refers to static storage.
Parallel std_thread_parallel(int threads = 0);

// Bytes of one packed vector: ceil(dim * bits / 8).
constexpr int64_t packed_size(int64_t dim, int bits) { return (dim * bits + 7) / 8; }

// A vLLM-style paged TurboQuant cache: codes [N, B, Hkv, P], norms [N, B, Hkv] of float32, or of
// float16 (half_norms: IEEE binary16 bits, the float32 norm rounded to nearest even).
struct PagedCache {
  uint8_t* k_codes;
  void* k_norms;
  uint8_t* v_codes;
  void* v_norms;
  int64_t num_blocks;   // N
  int64_t block_size;   // B
  int64_t num_kv_heads; // Hkv
  int64_t head_dim;     // D
  int k_bits;
  int v_bits;
  bool half_norms;

  float norm(const void* norms, int64_t row) const {
    return half_norms ? half_to_float(static_cast<const uint16_t*>(norms)[row]) : static_cast<const float*>(norms)[row];
  }
  void store_norm(void* norms, int64_t row, float value) const {
    if (half_norms) {
      static_cast<uint16_t*>(norms)[row] = float_to_half(value);
    } else {
      static_cast<float*>(norms)[row] = value;
    }
  }
};

// One kernel per op of the contract (tq_op_list.h), defined in tq_<stem>.cc (the prefill in
// tq_paged_attention.cc, whose per-(sequence, KV head) pass it shares), taking the op's
// generated call struct (tq_calls.h); the launch fields (workspace, stream) are unused here, the
// caller's Parallel spreads the work:
//   void tq::<stem>(const tq_<stem>_call& call, const Parallel& parallel)
// Each file's opening comment says what its op computes (the contract: tq_deploy/ops.py); the
// glue validates shapes and data first (tq_checks.h), the kernels trust their arguments.
#define TQ_CPU_DECLARE_KERNEL(stem, Pascal, float_types, norm_types) \
  void stem(const tq_##stem##_call& call, const Parallel& parallel);
TQ_FOR_EACH_OP(TQ_CPU_DECLARE_KERNEL)
#undef TQ_CPU_DECLARE_KERNEL

// The kernels as one overload set, for glue that is generic over the ops.
#define TQ_CPU_OVERLOAD(stem, Pascal, float_types, norm_types) \
  inline void run(const tq_##stem##_call& call, const Parallel& parallel) { stem(call, parallel); }
TQ_FOR_EACH_OP(TQ_CPU_OVERLOAD)
#undef TQ_CPU_OVERLOAD

}  // namespace tq
