// What the encode kernels (tq_encode.cu) share with the cache update (tq_cache_update.cu): where
// each encoded row goes, the launch arguments, and the launch for any input dtype.
#pragma once

#include "tq_cuda_common.cuh"

namespace tq_cuda {

// Where encoded row r goes: row r itself (TQEncode), or row slot[t] * H + h of the cache for
// r = t * H + h (TQCacheUpdate; skipped for a slot outside [0, N*B) and for a token that a later
// token with the same slot overrides: keep[t] == 0).
// A decode step's few tokens (<= kInlineTokens) need no keep[] pass: the row's lane compares its
// token's slot with the later tokens' itself, which saves a launch per step.
constexpr int64_t kInlineTokens = 32;

struct Rows {
  const int64_t* slots;  // nullptr: identity
  const uint8_t* keep;   // nullptr: every token writes, or (tokens <= kInlineTokens) checked inline
  int64_t heads, num_slots, tokens;
  __device__ __forceinline__ int64_t destination(int64_t r) const {
    if (slots == nullptr) return r;
    const int64_t t = r / heads;
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= num_slots || (keep != nullptr && !keep[t])) return -1;
    if (keep == nullptr && tokens <= kInlineTokens)
      for (int64_t u = t + 1; u < tokens; ++u)
        if (slots[u] == slot) return -1;  // a later token overrides this one
    return slot * heads + (r - t * heads);
  }
};

struct EncodeArgs {
  const void* x;
  int64_t rows;
  const float* rotation;
  const float* codebook;
  int bits;
  uint8_t* codes;
  void* norms;  // float32, or float16 (a cache's norm type: launch_encode_any's half_norms)
  Rows dest;
};

// Encodes a.rows rows of x (dtype `type`, head dim `dim`) into their destinations, on `stream`;
// half_norms: a.norms is float16 (each float32 norm rounded to nearest even; the codes are chosen
// with the float32 norm).
int launch_encode_any(const EncodeArgs& a, tq_cuda_dtype type, int64_t dim, bool half_norms, cudaStream_t stream);

}  // namespace tq_cuda
