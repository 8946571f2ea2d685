// TQEncode and TQCacheUpdate kernels (a cache update is an encode into slots): rows spread over threads.
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "tq_codes.h"
#include "tq_kernels.h"
#include "tq_simd.h"

namespace tq {
namespace {

using detail::Quantizer;

// u = x / ||x|| in place (zero vectors stay zero: no NaN from 0/0); returns ||x||. The norm is
// computed scaled (detail::scaled_norm), and u from the scaled x: the same bits as x / ||x||
// wherever ||x|| is a normal float32, and the right unit vector where it would over- or underflow.
TQ_INLINE float normalize(float* x, int64_t d) {
  int e = 0;
  const float scaled = detail::scaled_norm(x, d, &e);
  if (scaled > 0.f) {
    for (int64_t i = 0; i < d; ++i) x[i] /= scaled;
  } else {
    std::fill(x, x + d, 0.f);  // a zero vector (or a NaN one, whose NaN norm says so)
  }
  return std::ldexp(scaled, e);
}

// Normalize-rotate-quantize one float32 vector x (overwritten with u = x / ||x||).
// Normalizing before rotating follows the reference's rounding order: y = Pi u.
TQ_INLINE void encode_vector(float* x, const float* rotation, const Quantizer& q, float* y, uint8_t* codes,
                             float* norm_out) {
  *norm_out = normalize(x, q.dim);
  detail::matvec(rotation, x, y, q.dim);
  q.pack(y, codes);
}

constexpr int64_t kRowsPerTask = 32;

size_t task_count(int64_t rows) { return static_cast<size_t>((rows + kRowsPerTask - 1) / kRowsPerTask); }

TQ_INLINE int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

// The rotation with rows zero-padded to a multiple of 8 floats, for the blocked products.
std::vector<float> padded_rotation(const float* rotation, int64_t dim) {
  const int64_t dp = round_up8(dim);
  std::vector<float> out(static_cast<size_t>(dim * dp), 0.f);
  for (int64_t i = 0; i < dim; ++i) std::copy(rotation + i * dim, rotation + (i + 1) * dim, out.begin() + i * dp);
  return out;
}

struct EncodeJob {
  const void* x;
  DType x_type;
  int64_t rows, dim;
  const float* rotation_padded;  // [dim, round_up8(dim)]
  const Quantizer* quantizer;
  uint8_t* codes;
  float* norms;
};

// A task encodes up to kRowsPerTask rows: normalize each (u = x / ||x||, zero rows stay zero),
// Y = U Pi^T with a blocked micro-kernel (4 outputs x 2 rows per step), then quantize and pack.
TQ_MULTIVERSION void encode_task(void* ctx, size_t task) {
  const auto& job = *static_cast<const EncodeJob*>(ctx);
  const int64_t d = job.dim, dp = round_up8(d);
  const int64_t begin = static_cast<int64_t>(task) * kRowsPerTask;
  const int64_t count = std::min(job.rows, begin + kRowsPerTask) - begin;
  std::vector<float> u(static_cast<size_t>(kRowsPerTask * dp), 0.f), y(static_cast<size_t>(kRowsPerTask * d));
  for (int64_t r = 0; r < count; ++r) {
    float* row = u.data() + r * dp;
    detail::load_as_float(job.x, job.x_type, (begin + r) * d, d, row);
    job.norms[begin + r] = normalize(row, d);
  }
  const float* pi = job.rotation_padded;
  int64_t r = 0;
  for (; r + 2 <= count; r += 2) {
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) detail::dot_block<4, 2>(pi + i * dp, dp, u.data() + r * dp, dp, dp, y.data() + r * d + i, 1, d);
    for (; i < d; ++i) detail::dot_block<1, 2>(pi + i * dp, dp, u.data() + r * dp, dp, dp, y.data() + r * d + i, 1, d);
  }
  for (; r < count; ++r) {
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) detail::dot_block<4, 1>(pi + i * dp, dp, u.data() + r * dp, dp, dp, y.data() + r * d + i, 1, d);
    for (; i < d; ++i) detail::dot_block<1, 1>(pi + i * dp, dp, u.data() + r * dp, dp, dp, y.data() + r * d + i, 1, d);
  }
  for (r = 0; r < count; ++r) job.quantizer->pack(y.data() + r * d, job.codes + (begin + r) * job.quantizer->packed);
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
    encode_vector(xf.data(), job.rotation, *job.k_quantizer, y.data(), c.k_codes + row * job.k_quantizer->packed,
                  c.k_norms + row);
    detail::load_as_float(job.value, job.kv_type, src, d, xf.data());
    encode_vector(xf.data(), job.rotation, *job.v_quantizer, y.data(), c.v_codes + row * job.v_quantizer->packed,
                  c.v_norms + row);
  }
}

}  // namespace

void encode(const void* x, DType x_type, int64_t rows, int64_t dim, const float* rotation, const float* codebook,
            int bits, uint8_t* codes, float* norms, const Parallel& parallel) {
  const Quantizer quantizer(codebook, bits, dim);
  const std::vector<float> rotation_padded = padded_rotation(rotation, dim);
  EncodeJob job{x, x_type, rows, dim, rotation_padded.data(), &quantizer, codes, norms};
  parallel.for_each(task_count(rows), encode_task, &job);
}

void cache_update(const void* key, const void* value, DType kv_type, const int64_t* slot_mapping, int64_t num_tokens,
                  const PagedCache& cache, const float* rotation, const float* k_codebook, const float* v_codebook,
                  const Parallel& parallel) {
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
  const Quantizer kq(k_codebook, cache.k_bits, cache.head_dim);
  const Quantizer vq(v_codebook, cache.v_bits, cache.head_dim);
  CacheUpdateJob job{key, value, kv_type, slot_mapping, &tokens, &cache, rotation, &kq, &vq};
  parallel.for_each(tokens.size(), cache_update_task, &job);
}

}  // namespace tq
