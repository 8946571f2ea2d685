// TQCacheUpdate kernel: key/value [T, Hkv, D] encoded into the *_out caches (which hold the cache:
// in place or a copy) at slot_mapping[t] = block * B + offset; a negative slot skips its token and
// when several tokens name one slot the last one wins. One task per token that writes.
#include <algorithm>
#include <utility>
#include <vector>

#include "tq_codes.h"
#include "tq_kernels.h"
#include "tq_simd.h"

namespace tq {
namespace {

using detail::Quantizer;

// Normalize-rotate-quantize one float32 vector x (overwritten with u = x / ||x||); returns its
// float32 norm. Normalizing before rotating follows the reference's rounding order: y = Pi u.
TQ_INLINE float encode_vector(float* x, const float* rotation, const Quantizer& q, float* y, uint8_t* codes) {
  const float norm = detail::normalize(x, q.dim);
  detail::matvec(rotation, x, y, q.dim);
  q.pack(y, codes);
  return norm;
}

struct CacheUpdateJob {
  const void* key;
  const void* value;
  DType kv_type;
  const int64_t* slot_mapping;
  const std::vector<int64_t>* tokens;  // tokens that actually write (last writer per slot)
  const PagedCache* cache;
  const float* rotation;
  const Quantizer* k_quantizer;
  const Quantizer* v_quantizer;
};

// One task = one token: all of its KV heads, keys and values.
TQ_MULTIVERSION void cache_update_task(void* ctx, size_t task) {
  const auto& job = *static_cast<const CacheUpdateJob*>(ctx);
  const PagedCache& c = *job.cache;
  const int64_t d = c.head_dim, hkv = c.num_kv_heads;
  const int64_t t = (*job.tokens)[task];
  const int64_t slot = job.slot_mapping[t];
  std::vector<float> xf(d), y(d);
  for (int64_t h = 0; h < hkv; ++h) {
    const int64_t src = (t * hkv + h) * d;
    const int64_t row = slot * hkv + h;
    detail::load_as_float(job.key, job.kv_type, src, d, xf.data());
    c.store_norm(c.k_norms, row,
                 encode_vector(xf.data(), job.rotation, *job.k_quantizer, y.data(),
                               c.k_codes + row * job.k_quantizer->packed));
    detail::load_as_float(job.value, job.kv_type, src, d, xf.data());
    c.store_norm(c.v_norms, row,
                 encode_vector(xf.data(), job.rotation, *job.v_quantizer, y.data(),
                               c.v_codes + row * job.v_quantizer->packed));
  }
}

}  // namespace

void cache_update(const tq_cache_update_call& c, const Parallel& parallel) {
  const int64_t* slot_mapping = c.slot_mapping;
  const int64_t num_tokens = c.num_tokens;
  const PagedCache cache{c.k_codes_out, c.k_norms_out,  c.v_codes_out, c.v_norms_out, c.num_blocks, c.block_size,
                         c.num_kv_heads, c.head_dim,    c.k_bits,      c.v_bits,       c.norm_dtype == TQ_FLOAT16};
  // Keep only the last token that names each slot, so concurrent tasks never write one slot twice.
  std::vector<std::pair<int64_t, int64_t>> slot_token;
  slot_token.reserve(static_cast<size_t>(num_tokens));
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slot_mapping[t] >= 0) slot_token.emplace_back(slot_mapping[t], t);
  }
  std::sort(slot_token.begin(), slot_token.end());
  std::vector<int64_t> tokens;
  tokens.reserve(slot_token.size());
  for (size_t i = 0; i < slot_token.size(); ++i) {
    if (i + 1 == slot_token.size() || slot_token[i + 1].first != slot_token[i].first) {
      tokens.push_back(slot_token[i].second);
    }
  }
  const Quantizer kq(c.k_codebook, cache.k_bits, cache.head_dim);
  const Quantizer vq(c.v_codebook, cache.v_bits, cache.head_dim);
  CacheUpdateJob job{c.key, c.value, static_cast<DType>(c.dtype), slot_mapping, &tokens, &cache, c.rotation, &kq, &vq};
  parallel.for_each(tokens.size(), cache_update_task, &job);
}

}  // namespace tq
