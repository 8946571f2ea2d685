// CPU implementation of the TurboQuant kernels declared in tq_kernels.h.
#include "tq_kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "tq_half.h"

namespace tq {

// ---------------------------------------------------------------------------------------------
// Threading
// ---------------------------------------------------------------------------------------------

void Parallel::for_each(size_t total, Task task, void* task_ctx) const {
  if (run == nullptr || total <= 1) {
    for (size_t i = 0; i < total; ++i) task(task_ctx, i);
    return;
  }
  run(runner, task, total, task_ctx);
}

namespace {

void run_on_std_threads(void* runner, Parallel::Task task, size_t total, void* task_ctx) {
  size_t threads = static_cast<size_t>(reinterpret_cast<intptr_t>(runner));
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, total);
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) task(task_ctx, i);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

// ---------------------------------------------------------------------------------------------
// Vector helpers. Eight independent accumulators let the compiler vectorize the reduction
// without -ffast-math (a plain `s += a[i] * b[i]` loop must stay sequential).
// ---------------------------------------------------------------------------------------------

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// y = M x for a row-major square M [n, n].
inline void matvec(const float* m, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = dot(m + i * n, x, n);
}

// y = M^T x (= x @ M) for a row-major square M [n, n].
inline void matvec_transposed(const float* m, const float* x, float* y, int64_t n) {
  std::fill(y, y + n, 0.f);
  for (int64_t i = 0; i < n; ++i) axpy(x[i], m + i * n, y, n);
}

inline void load_as_float(const void* src, DType type, int64_t offset, int64_t n, float* dst) {
  if (type == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(src) + offset, static_cast<size_t>(n) * sizeof(float));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(h[i]);
  }
}

inline void store_from_float(const float* src, int64_t n, void* dst, DType type, int64_t offset) {
  if (type == DType::kFloat32) {
    std::memcpy(static_cast<float*>(dst) + offset, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    uint16_t* h = static_cast<uint16_t*>(dst) + offset;
    for (int64_t i = 0; i < n; ++i) h[i] = float_to_half(src[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Quantization: nearest centroid = number of midpoints strictly below the value.
// ---------------------------------------------------------------------------------------------

struct Quantizer {
  int bits;
  int64_t dim;
  int64_t packed;
  std::vector<float> boundaries;  // 2**bits - 1 ascending midpoints

  Quantizer(const float* codebook, int bits_, int64_t dim_)
      : bits(bits_), dim(dim_), packed(packed_size(dim_, bits_)) {
    const int k = 1 << bits;
    boundaries.resize(k - 1);
    for (int i = 0; i + 1 < k; ++i) boundaries[i] = 0.5f * (codebook[i] + codebook[i + 1]);
  }

  inline uint8_t code_of(float y) const {
    uint8_t code = 0;
    for (float b : boundaries) code += static_cast<uint8_t>(b < y);
    return code;
  }

  // Little-endian bit stream: code i occupies bits [i*bits, (i+1)*bits); a 3-bit code may
  // straddle two bytes.
  void pack(const float* y, uint8_t* out) const {
    std::memset(out, 0, static_cast<size_t>(packed));
    for (int64_t i = 0; i < dim; ++i) {
      const int64_t bit = i * bits;
      const uint32_t v = static_cast<uint32_t>(code_of(y[i])) << (bit & 7);
      out[bit >> 3] |= static_cast<uint8_t>(v & 0xffu);
      if ((bit & 7) + bits > 8) out[(bit >> 3) + 1] |= static_cast<uint8_t>(v >> 8);
    }
  }
};

// Maps packed bytes straight to centroid values. For 1, 2 and 4 bits a byte holds 8/bits whole
// codes, so one 256-entry table of centroid tuples turns a byte into floats with one copy.
// 3-bit codes come in groups of 8 per 3 bytes.
struct Dequantizer {
  int bits;
  int64_t dim;
  int64_t packed;
  int per_byte;
  const float* codebook;
  std::vector<float> byte_table;  // [256][per_byte], bits in {1, 2, 4}

  Dequantizer(const float* codebook_, int bits_, int64_t dim_)
      : bits(bits_), dim(dim_), packed(packed_size(dim_, bits_)), per_byte(8 / bits_), codebook(codebook_) {
    if (bits != 3) {
      byte_table.resize(256 * static_cast<size_t>(per_byte));
      const unsigned mask = (1u << bits) - 1u;
      for (unsigned b = 0; b < 256; ++b) {
        for (int k = 0; k < per_byte; ++k) byte_table[b * per_byte + k] = codebook[(b >> (k * bits)) & mask];
      }
    }
  }

  // Floats written by unpack(): dim rounded up to whole bytes (1/2/4 bits) or groups (3 bits).
  int64_t padded_dim() const { return bits == 3 ? (packed + 2) / 3 * 8 : packed * per_byte; }

  void unpack(const uint8_t* p, float* out) const {
    if (bits == 3) {
      const int64_t full = packed / 3;
      for (int64_t g = 0; g < full; ++g, p += 3, out += 8) {
        const uint32_t w = p[0] | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16);
        for (int k = 0; k < 8; ++k) out[k] = codebook[(w >> (3 * k)) & 7u];
      }
      const int64_t rest = packed - full * 3;
      if (rest > 0) {
        uint32_t w = p[0];
        if (rest > 1) w |= static_cast<uint32_t>(p[1]) << 8;
        for (int k = 0; k < 8; ++k) out[k] = codebook[(w >> (3 * k)) & 7u];
      }
      return;
    }
    const size_t step = static_cast<size_t>(per_byte);
    for (int64_t i = 0; i < packed; ++i) {
      std::memcpy(out + i * per_byte, byte_table.data() + p[i] * step, step * sizeof(float));
    }
  }
};

// Normalize-rotate-quantize one float32 vector x (overwritten with u = x / ||x||). Normalizing
// before rotating follows the reference's rounding order: y = Pi u.
void encode_vector(float* x, const float* rotation, const Quantizer& q, float* y, uint8_t* codes, float* norm_out) {
  const int64_t d = q.dim;
  const float norm = std::sqrt(dot(x, x, d));
  *norm_out = norm;
  if (norm > 0.f) {
    for (int64_t i = 0; i < d; ++i) x[i] /= norm;
    matvec(rotation, x, y, d);
  } else {
    std::fill(y, y + d, 0.f);
  }
  q.pack(y, codes);
}

constexpr int64_t kEncodeRowsPerTask = 32;

struct EncodeJob {
  const void* x;
  DType x_type;
  int64_t rows, dim;
  const float* rotation;
  const Quantizer* quantizer;
  uint8_t* codes;
  float* norms;
};

void encode_task(void* ctx, size_t task) {
  const auto& job = *static_cast<const EncodeJob*>(ctx);
  const int64_t begin = static_cast<int64_t>(task) * kEncodeRowsPerTask;
  const int64_t end = std::min(job.rows, begin + kEncodeRowsPerTask);
  std::vector<float> xf(job.dim), y(job.dim);
  for (int64_t r = begin; r < end; ++r) {
    load_as_float(job.x, job.x_type, r * job.dim, job.dim, xf.data());
    encode_vector(xf.data(), job.rotation, *job.quantizer, y.data(), job.codes + r * job.quantizer->packed,
                  job.norms + r);
  }
}

struct DecodeJob {
  const uint8_t* codes;
  const float* norms;
  int64_t rows, dim;
  const float* rotation;
  const Dequantizer* dequantizer;
  float* x_hat;
};

void decode_task(void* ctx, size_t task) {
  const auto& job = *static_cast<const DecodeJob*>(ctx);
  const int64_t begin = static_cast<int64_t>(task) * kEncodeRowsPerTask;
  const int64_t end = std::min(job.rows, begin + kEncodeRowsPerTask);
  std::vector<float> c(job.dequantizer->padded_dim());
  for (int64_t r = begin; r < end; ++r) {
    job.dequantizer->unpack(job.codes + r * job.dequantizer->packed, c.data());
    float* out = job.x_hat + r * job.dim;
    matvec_transposed(job.rotation, c.data(), out, job.dim);
    const float norm = job.norms[r];
    for (int64_t i = 0; i < job.dim; ++i) out[i] *= norm;
  }
}

size_t task_count(int64_t rows) { return static_cast<size_t>((rows + kEncodeRowsPerTask - 1) / kEncodeRowsPerTask); }

}  // namespace

Parallel std_thread_parallel(int threads) {
  Parallel p;
  p.run = run_on_std_threads;
  p.runner = reinterpret_cast<void*>(static_cast<intptr_t>(std::max(threads, 0)));
  return p;
}

void encode(const void* x, DType x_type, int64_t rows, int64_t dim, const float* rotation, const float* codebook,
            int bits, uint8_t* codes, float* norms, const Parallel& parallel) {
  const Quantizer quantizer(codebook, bits, dim);
  EncodeJob job{x, x_type, rows, dim, rotation, &quantizer, codes, norms};
  parallel.for_each(task_count(rows), encode_task, &job);
}

void decode(const uint8_t* codes, const float* norms, int64_t rows, int64_t dim, const float* rotation,
            const float* codebook, int bits, float* x_hat, const Parallel& parallel) {
  const Dequantizer dequantizer(codebook, bits, dim);
  DecodeJob job{codes, norms, rows, dim, rotation, &dequantizer, x_hat};
  parallel.for_each(task_count(rows), decode_task, &job);
}

// ---------------------------------------------------------------------------------------------
// Cache update
// ---------------------------------------------------------------------------------------------

namespace {

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
void cache_update_task(void* ctx, size_t task) {
  const auto& job = *static_cast<const CacheUpdateJob*>(ctx);
  const PagedCache& c = *job.cache;
  const int64_t d = c.head_dim, hkv = c.num_kv_heads;
  const int64_t t = (*job.tokens)[task];
  const int64_t slot = job.slot_mapping[t];
  std::vector<float> xf(d), y(d);
  for (int64_t h = 0; h < hkv; ++h) {
    const int64_t src = (t * hkv + h) * d;
    const int64_t row = slot * hkv + h;
    load_as_float(job.key, job.kv_type, src, d, xf.data());
    encode_vector(xf.data(), job.rotation, *job.k_quantizer, y.data(), c.k_codes + row * job.k_quantizer->packed,
                  c.k_norms + row);
    load_as_float(job.value, job.kv_type, src, d, xf.data());
    encode_vector(xf.data(), job.rotation, *job.v_quantizer, y.data(), c.v_codes + row * job.v_quantizer->packed,
                  c.v_norms + row);
  }
}

}  // namespace

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

// ---------------------------------------------------------------------------------------------
// Paged attention: one fused pass per (sequence, KV head) with an online softmax. The query heads
// sharing the KV head (GQA group) are handled together, so every cached token is unpacked once
// and scored against all of them. Codes are read straight from the cache; only one token's
// centroid values live in a small buffer at a time.
// ---------------------------------------------------------------------------------------------

namespace {

constexpr int64_t kTokensPerChunk = 64;  // online-softmax rescale granularity

struct AttentionJob {
  const void* query;
  DType q_type;
  int64_t num_q_heads, group;
  const PagedCache* cache;
  const int32_t* block_tables;
  int64_t max_blocks;
  const int32_t* context_lens;
  const float* rotation;
  const Dequantizer* k_dequantizer;
  const Dequantizer* v_dequantizer;
  float scale;
  void* out;
};

void attention_task(void* ctx, size_t task) {
  const auto& job = *static_cast<const AttentionJob*>(ctx);
  const PagedCache& c = *job.cache;
  const int64_t d = c.head_dim, hkv = c.num_kv_heads, bsz = c.block_size, g_count = job.group;
  const int64_t s = static_cast<int64_t>(task) / hkv;
  const int64_t kv_head = static_cast<int64_t>(task) % hkv;
  const int64_t first_q_head = kv_head * g_count;
  const int64_t ctx_len = job.context_lens[s];

  std::vector<float> out_buf(d);
  if (ctx_len <= 0) {
    std::fill(out_buf.begin(), out_buf.end(), 0.f);
    for (int64_t g = 0; g < g_count; ++g) {
      store_from_float(out_buf.data(), d, job.out, job.q_type, (s * job.num_q_heads + first_q_head + g) * d);
    }
    return;
  }

  // q_rot = scale * Pi q for each query head of the group.
  std::vector<float> q_rot(g_count * d), acc(g_count * d, 0.f), qf(d);
  for (int64_t g = 0; g < g_count; ++g) {
    load_as_float(job.query, job.q_type, (s * job.num_q_heads + first_q_head + g) * d, d, qf.data());
    float* qr = q_rot.data() + g * d;
    matvec(job.rotation, qf.data(), qr, d);
    for (int64_t i = 0; i < d; ++i) qr[i] *= job.scale;
  }

  std::vector<float> k_buf(job.k_dequantizer->padded_dim()), v_buf(job.v_dequantizer->padded_dim());
  std::vector<float> probs(g_count * kTokensPerChunk);
  std::vector<float> running_max(g_count, -std::numeric_limits<float>::infinity()), running_sum(g_count, 0.f);
  std::vector<int64_t> rows(kTokensPerChunk);
  const int32_t* table = job.block_tables + s * job.max_blocks;
  const int64_t pk = job.k_dequantizer->packed, pv = job.v_dequantizer->packed;

  for (int64_t t0 = 0; t0 < ctx_len; t0 += kTokensPerChunk) {
    const int64_t n = std::min(kTokensPerChunk, ctx_len - t0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = t0 + i;
      rows[i] = (static_cast<int64_t>(table[t / bsz]) * bsz + t % bsz) * hkv + kv_head;
    }
    // Scores of the chunk: s = k_norm * <q_rot, c_k[idx]> (scale already in q_rot).
    for (int64_t i = 0; i < n; ++i) {
      job.k_dequantizer->unpack(c.k_codes + rows[i] * pk, k_buf.data());
      const float k_norm = c.k_norms[rows[i]];
      for (int64_t g = 0; g < g_count; ++g) probs[g * kTokensPerChunk + i] = k_norm * dot(q_rot.data() + g * d, k_buf.data(), d);
    }
    // Online softmax: rescale the running sums once per chunk.
    for (int64_t g = 0; g < g_count; ++g) {
      float* p = probs.data() + g * kTokensPerChunk;
      float chunk_max = p[0];
      for (int64_t i = 1; i < n; ++i) chunk_max = std::max(chunk_max, p[i]);
      const float new_max = std::max(running_max[g], chunk_max);
      if (new_max > running_max[g]) {
        const float alpha = std::exp(running_max[g] - new_max);
        running_sum[g] *= alpha;
        float* a = acc.data() + g * d;
        for (int64_t j = 0; j < d; ++j) a[j] *= alpha;
        running_max[g] = new_max;
      }
      float sum = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        p[i] = std::exp(p[i] - new_max);
        sum += p[i];
      }
      running_sum[g] += sum;
    }
    // acc += p * v_norm * c_v[idx] for each query head of the group.
    for (int64_t i = 0; i < n; ++i) {
      job.v_dequantizer->unpack(c.v_codes + rows[i] * pv, v_buf.data());
      const float v_norm = c.v_norms[rows[i]];
      for (int64_t g = 0; g < g_count; ++g) axpy(probs[g * kTokensPerChunk + i] * v_norm, v_buf.data(), acc.data() + g * d, d);
    }
  }

  // out = Pi^T (acc / sum)
  for (int64_t g = 0; g < g_count; ++g) {
    float* a = acc.data() + g * d;
    const float inv = 1.f / running_sum[g];
    for (int64_t j = 0; j < d; ++j) a[j] *= inv;
    matvec_transposed(job.rotation, a, out_buf.data(), d);
    store_from_float(out_buf.data(), d, job.out, job.q_type, (s * job.num_q_heads + first_q_head + g) * d);
  }
}

}  // namespace

void paged_attention(const void* query, DType q_type, int64_t num_seqs, int64_t num_q_heads, const PagedCache& cache,
                     const int32_t* block_tables, int64_t max_blocks, const int32_t* context_lens,
                     const float* rotation, const float* k_codebook, const float* v_codebook, float scale, void* out,
                     const Parallel& parallel) {
  const Dequantizer kd(k_codebook, cache.k_bits, cache.head_dim);
  const Dequantizer vd(v_codebook, cache.v_bits, cache.head_dim);
  const float used_scale =
      scale > 0.f ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(cache.head_dim)));
  AttentionJob job{query,      q_type,       num_q_heads, num_q_heads / cache.num_kv_heads,
                   &cache,     block_tables, max_blocks,  context_lens,
                   rotation,   &kd,          &vd,         used_scale,
                   out};
  parallel.for_each(static_cast<size_t>(num_seqs * cache.num_kv_heads), attention_task, &job);
}

}  // namespace tq
