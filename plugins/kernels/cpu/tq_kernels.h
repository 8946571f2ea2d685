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
//
// Callers validate shapes and data first (tq_checks.h); these functions trust their
// arguments. Work is spread over threads through a caller-supplied Parallel.
#pragma once

#include <cstddef>
#include <cstdint>

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

// x [rows, dim] (float32 or float16) -> codes [rows, packed_size(dim, bits)], norms [rows].
void encode(const void* x, DType x_type, int64_t rows, int64_t dim, const float* rotation,
            const float* codebook, int bits, uint8_t* codes, float* norms, const Parallel& parallel);

// codes [rows, P], norms [rows] -> x_hat [rows, dim] float32.
void decode(const uint8_t* codes, const float* norms, int64_t rows, int64_t dim, const float* rotation,
            const float* codebook, int bits, float* x_hat, const Parallel& parallel);

// A vLLM-style paged TurboQuant cache: codes [N, B, Hkv, P], norms [N, B, Hkv].
struct PagedCache {
  uint8_t* k_codes;
  float* k_norms;
  uint8_t* v_codes;
  float* v_norms;
  int64_t num_blocks;   // N
  int64_t block_size;   // B
  int64_t num_kv_heads; // Hkv
  int64_t head_dim;     // D
  int k_bits;
  int v_bits;
};

// Encodes key/value [T, Hkv, D] into the cache (in place) at slot_mapping[t] = block * B + offset;
// negative slots are skipped; when several tokens name one slot the last one wins.
// Slots must be < N * B (see check_slot_mapping).
void cache_update(const void* key, const void* value, DType kv_type, const int64_t* slot_mapping,
                  int64_t num_tokens, const PagedCache& cache, const float* rotation,
                  const float* k_codebook, const float* v_codebook, const Parallel& parallel);

// query [S, Hq, D] (float32/float16) -> out [S, Hq, D] of the same dtype.
// block_tables [S, M] int32, context_lens [S] int32 (validated: see check_block_tables).
// scale <= 0 means 1/sqrt(D).
void paged_attention(const void* query, DType q_type, int64_t num_seqs, int64_t num_q_heads,
                     const PagedCache& cache, const int32_t* block_tables, int64_t max_blocks,
                     const int32_t* context_lens, const float* rotation, const float* k_codebook,
                     const float* v_codebook, float scale, void* out, const Parallel& parallel);

}  // namespace tq
