// TQCacheUpdate on the GPU: key/value [T, Hkv, D] encoded into the *_out caches (which the caller
// makes hold the cache first: in place) by the encode kernels of tq_encode.cu, each row landing in
// its cache slot (Rows). A float16 cache (norm_dtype) stores each float32 norm rounded to nearest
// even, its codes chosen with the float32 norm. A negative or out-of-range slot skips its token;
// when several tokens name one slot the last one wins, found first (keep[]) for more than
// kInlineTokens tokens, whose bookkeeping is the workspace.
#include <algorithm>

#include "tq_cuda_common.cuh"
#include "tq_encode_rows.cuh"

namespace tq_cuda {
namespace {

// keep[t] = 1 when no later token names slot_mapping[t] (the last writer of a slot wins).
// Few tokens (a decode step): each CTA compares its 256 tokens with every later token, 256 at a
// time through shared memory. Many tokens (a prefill): an open-addressing table keyed by slot
// keeps the largest token index of each slot (atomicMax), then each token checks it is that one:
// linear in the tokens, where the pairwise comparison is quadratic.
constexpr int kDedupThreads = 256;
constexpr int64_t kPairwiseTokens = 4096;
constexpr unsigned long long kEmptySlot = ~0ull;

__global__ void __launch_bounds__(kDedupThreads) last_writer_kernel(const int64_t* slots, int64_t tokens,
                                                                    uint8_t* keep) {
  __shared__ int64_t later[kDedupThreads];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kDedupThreads + threadIdx.x;
  const int64_t mine = t < tokens ? slots[t] : -1;
  bool overridden = false;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kDedupThreads; base < tokens; base += kDedupThreads) {
    __syncthreads();
    const int64_t u = base + threadIdx.x;
    later[threadIdx.x] = u < tokens ? slots[u] : -1;
    __syncthreads();
    for (int i = 0; i < kDedupThreads; ++i) overridden |= base + i > t && later[i] == mine;
  }
  if (t < tokens) keep[t] = !overridden;
}

struct SlotTable {
  unsigned long long* keys;  // slot, or kEmptySlot
  int* last;                 // the largest token index that names keys[h]
  uint32_t mask;             // capacity - 1 (a power of two >= 2 * tokens)
  __device__ __forceinline__ uint32_t home(int64_t slot) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(slot) * 0x9E3779B97F4A7C15ull) >> 32) & mask;
  }
};

__global__ void __launch_bounds__(kDedupThreads) slot_table_insert(const int64_t* slots, int64_t tokens,
                                                                   SlotTable table) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kDedupThreads + threadIdx.x;
  if (t >= tokens) return;
  const int64_t slot = slots[t];
  if (slot < 0) return;  // skipped tokens need no entry
  for (uint32_t h = table.home(slot);; h = (h + 1) & table.mask) {
    const unsigned long long prev = atomicCAS(table.keys + h, kEmptySlot, static_cast<unsigned long long>(slot));
    if (prev == kEmptySlot || prev == static_cast<unsigned long long>(slot)) {
      atomicMax(table.last + h, static_cast<int>(t));
      return;
    }
  }
}

__global__ void __launch_bounds__(kDedupThreads) slot_table_keep(const int64_t* slots, int64_t tokens,
                                                                 SlotTable table, uint8_t* keep) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kDedupThreads + threadIdx.x;
  if (t >= tokens) return;
  const int64_t slot = slots[t];
  if (slot < 0) {
    keep[t] = 0;
    return;
  }
  uint32_t h = table.home(slot);
  while (table.keys[h] != static_cast<unsigned long long>(slot)) h = (h + 1) & table.mask;
  keep[t] = table.last[h] == static_cast<int>(t);
}

uint32_t table_capacity(int64_t tokens) {
  uint32_t capacity = 1;
  while (capacity < 2 * tokens) capacity <<= 1;
  return capacity;
}

size_t dedupe_bytes(int64_t tokens) {
  if (tokens <= kInlineTokens) return 0;
  size_t bytes = align256(static_cast<size_t>(tokens));
  if (tokens > kPairwiseTokens) bytes += align256(size_t{table_capacity(tokens)} * 12);
  return bytes;
}

// Fills keep[0, tokens) (workspace of dedupe_bytes(tokens)); returns the launches' status.
int last_writers(const int64_t* slots, int64_t tokens, void* workspace, uint8_t* keep_out[1], cudaStream_t stream) {
  uint8_t* keep = static_cast<uint8_t*>(workspace);
  *keep_out = keep;
  const unsigned grid = static_cast<unsigned>((tokens + kDedupThreads - 1) / kDedupThreads);
  if (tokens <= kPairwiseTokens) {
    last_writer_kernel<<<grid, kDedupThreads, 0, stream>>>(slots, tokens, keep);
    return launch_status();
  }
  const uint32_t capacity = table_capacity(tokens);
  char* base = static_cast<char*>(workspace) + align256(static_cast<size_t>(tokens));
  SlotTable table{reinterpret_cast<unsigned long long*>(base), reinterpret_cast<int*>(base + size_t{capacity} * 8),
                  capacity - 1};
  // keys all kEmptySlot and last all -1: both are the all-ones bytes
  if (cudaError_t rc = cudaMemsetAsync(base, 0xff, size_t{capacity} * 12, stream)) return static_cast<int>(rc);
  slot_table_insert<<<grid, kDedupThreads, 0, stream>>>(slots, tokens, table);
  slot_table_keep<<<grid, kDedupThreads, 0, stream>>>(slots, tokens, table, keep);
  return launch_status();
}

}  // namespace
}  // namespace tq_cuda

using namespace tq_cuda;

extern "C" size_t tq_cuda_cache_update_workspace(const tq_cache_update_call* c) {
  return c == nullptr ? 0 : dedupe_bytes(c->num_tokens);
}

extern "C" int tq_cuda_cache_update(const tq_cache_update_call* c) {
  if (c == nullptr || c->num_tokens < 0 || c->num_tokens > (int64_t{1} << 30) || c->num_kv_heads < 1 ||
      c->head_dim < 1 || c->head_dim > 8192 || c->num_blocks < 0 || c->block_size < 1 || !valid_bits(c->k_bits) ||
      !valid_bits(c->v_bits) || !valid_norm_dtype(c->norm_dtype))
    return TQ_CUDA_BAD_ARGUMENT;
  if (c->num_tokens == 0) return 0;
  cudaStream_t stream = static_cast<cudaStream_t>(c->stream);
  const tq_cuda_dtype kv_type = static_cast<tq_cuda_dtype>(c->dtype);
  uint8_t* keep = nullptr;
  if (c->num_tokens > kInlineTokens) {
    if (c->workspace == nullptr || c->workspace_bytes < dedupe_bytes(c->num_tokens)) return TQ_CUDA_BAD_ARGUMENT;
    if (int rc = last_writers(c->slot_mapping, c->num_tokens, c->workspace, &keep, stream)) return rc;
  }
  const Rows dest{c->slot_mapping, keep, c->num_kv_heads, c->num_blocks * c->block_size, c->num_tokens};
  const int64_t rows = c->num_tokens * c->num_kv_heads;
  const bool half_norms = c->norm_dtype == TQ_FLOAT16;
  EncodeArgs k{c->key, rows, c->rotation, c->k_codebook, c->k_bits, c->k_codes_out, c->k_norms_out, dest};
  if (int rc = launch_encode_any(k, kv_type, c->head_dim, half_norms, stream)) return rc;
  EncodeArgs v{c->value, rows, c->rotation, c->v_codebook, c->v_bits, c->v_codes_out, c->v_norms_out, dest};
  return launch_encode_any(v, kv_type, c->head_dim, half_norms, stream);
}
