// TQPagedAttention and TQPagedPrefill kernels: one fused pass per (sequence, KV head) with an
// online softmax.
//
// The query heads that share a KV head (the GQA group) are processed together, so each cached
// token's codes are unpacked once and scored against every head of the group. A prefill task
// takes a few consecutive query rows of one sequence times the group the same way: each row is a
// decode query of its sequence whose context ends at its own position (position + 1 tokens), so
// the rows share every unpacked tile and the diagonal tile masks what a row must not see. Tokens go in
// chunks of kChunk: their codes are unpacked straight from the paged cache into two small
// thread-local tiles of centroid values (kChunk x D floats each, L1/L2 resident; the cache is
// never decompressed as a whole), then
//     scores  s[g][t] = k_norm_t * <scale * q_rot[g], c_k[idx_k_t]>      (register-blocked)
//     softmax running max / sum per head, rescaled once per chunk
//     acc[g]  += p[g][t] * v_norm_t * c_v[idx_v_t]                       (register-blocked)
// and at the end out[g] = Pi^T (acc[g] / sum[g]). A row's tokens past its limit get weight 0
// (never p * v_norm: a later token's norm may be NaN).
// With a key mean (ops.py) each score of a token at t >= 1 also gets scale * q . R_t mu: A and B
// (D/2 each, from the unrotated query) once per row, then one D-long dot product per score with
// [cos; sin](t * w), read from a table of every position up to the call's longest context. The
// table depends on the RoPE rates only, so it is built once per process and rates (every layer of
// a model shares them) and grown when a context outgrows it: a decode step reads it, never
// recomputes D/2 sines and cosines per cached token.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "tq_codes.h"
#include "tq_kernels.h"
#include "tq_simd.h"

namespace tq {
namespace {

using detail::Dequantizer;

constexpr int64_t kChunk = 32;  // tokens per tile / online-softmax rescale

TQ_INLINE int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

using detail::F8;

// out[h * kChunk + t] = <q[h], k[t]> for NH query heads and the n tokens of a tile.
template <int NH>
TQ_INLINE void score_heads(const float* q, const float* k_tile, int64_t n, int64_t ds, float* out) {
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) detail::dot_block<NH, 2>(q, ds, k_tile + t * ds, ds, ds, out + t, kChunk, 1);
  for (; t < n; ++t) detail::dot_block<NH, 1>(q, ds, k_tile + t * ds, ds, ds, out + t, kChunk, 1);
}

// acc[h] += sum_t w[h * kChunk + t] * v[t] for NH heads; NH accumulator vectors per 8 lanes stay
// in registers across all tokens of the chunk.
template <int NH>
TQ_INLINE void accumulate_heads(float* acc, const float* w, const float* v_tile, int64_t n, int64_t ds) {
  for (int64_t d = 0; d < ds; d += 8) {
    F8 a[NH];
    for (int h = 0; h < NH; ++h) a[h] = detail::f8_load(acc + h * ds + d);
    for (int64_t t = 0; t < n; ++t) {
      const F8 v = detail::f8_load(v_tile + t * ds + d);
      for (int h = 0; h < NH; ++h) a[h] += v * w[h * kChunk + t];  // scalar broadcast
    }
    for (int h = 0; h < NH; ++h) detail::f8_store(acc + h * ds + d, a[h]);
  }
}

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
  // Split-K: each (sequence, KV head) context is cut into `splits` ranges of split_len tokens
  // whose partial softmax states land in `partial` and are merged afterwards (splits == 1:
  // no partials, the task writes the output itself).
  int64_t splits;
  int64_t split_len;
  float* partial;  // [S, Hkv, splits, group, D + 2]: acc (rotated domain), running max, running sum
  // Prefill: query rows [query_start[s], query_start[s + 1]) belong to sequence s; tasks are the
  // `tiles` (sequence, first row) pairs of up to rows_per_tile rows each, times the KV heads.
  const int32_t* query_start;
  int64_t rows_per_tile;
  const int64_t* tiles;  // [num_tiles, 2]
  // The key mean (null when the node has none): mu [Hkv, D], and [cos; sin](t * w) of position t at
  // rope_table + t * D (RopeTable).
  const float* key_mean;
  const float* rope_table;
};

// [cos; sin] of the float32 angles t * w_j (the contract's product) for t < positions, D floats per
// position. One table at a time is kept (the latest rates seen); a call holds its own reference.
class RopeTable {
 public:
  static std::shared_ptr<const std::vector<float>> get(const float* rates, int64_t half, int64_t positions,
                                                       const Parallel& parallel) {
    static std::mutex mutex;
    static std::shared_ptr<const RopeTable> latest;
    std::lock_guard<std::mutex> lock(mutex);
    if (!(latest && latest->matches(rates, half) && latest->positions_ >= positions)) {
      // grow geometrically: a decode loop's context passes each size once
      const int64_t size = std::max<int64_t>(positions, latest && latest->matches(rates, half) ? 2 * latest->positions_ : 0);
      latest = std::make_shared<const RopeTable>(rates, half, std::max<int64_t>(size, 64), parallel);
    }
    return std::shared_ptr<const std::vector<float>>(latest, &latest->values_);
  }

  RopeTable(const float* rates, int64_t half, int64_t positions, const Parallel& parallel)
      : rates_(rates, rates + half), positions_(positions), values_(static_cast<size_t>(positions * 2 * half)) {
    struct Fill {
      const RopeTable* table;
      float* out;
    } fill{this, values_.data()};
    constexpr int64_t kRows = 256;
    parallel.for_each(static_cast<size_t>((positions + kRows - 1) / kRows), [](void* ctx, size_t task) {
      const auto& f = *static_cast<const Fill*>(ctx);
      const int64_t h = static_cast<int64_t>(f.table->rates_.size());
      const int64_t end = std::min<int64_t>(f.table->positions_, static_cast<int64_t>(task + 1) * kRows);
      for (int64_t t = static_cast<int64_t>(task) * kRows; t < end; ++t) {
        float* row = f.out + t * 2 * h;
        for (int64_t j = 0; j < h; ++j) {
          const float angle = static_cast<float>(t) * f.table->rates_[j];
          row[j] = std::cos(angle);
          row[h + j] = std::sin(angle);
        }
      }
    }, &fill);
  }

 private:
  bool matches(const float* rates, int64_t half) const {
    return static_cast<int64_t>(rates_.size()) == half && std::equal(rates_.begin(), rates_.end(), rates);
  }
  std::vector<float> rates_;
  int64_t positions_;
  std::vector<float> values_;
};

// The query (and output) vectors of a task: vector index (token * Hq + head) and how many of the
// sequence's tokens each one sees.
struct QueryRows {
  std::vector<int64_t> vec, limit;
};

// The group of KV head kv_head for query token `token`, seeing `limit` tokens.
TQ_INLINE void add_group(const AttentionJob& job, int64_t token, int64_t kv_head, int64_t limit, QueryRows& rows) {
  for (int64_t g = 0; g < job.group; ++g) {
    rows.vec.push_back(token * job.num_q_heads + kv_head * job.group + g);
    rows.limit.push_back(limit);
  }
}

// out[g] = Pi^T (acc[g] / sum[g]) for the rows' query vectors. A sum of 0 means no tokens: zeros;
// a NaN sum (a NaN or overflowing score) gives NaN, never zeros.
TQ_INLINE void write_output(const AttentionJob& job, const QueryRows& rows, const float* acc, int64_t stride,
                            const float* sums) {
  const int64_t d = job.cache->head_dim;
  std::vector<float> normalized(d), out(d);
  for (size_t g = 0; g < rows.vec.size(); ++g) {
    if (sums[g] != 0.f) {
      const float inv = 1.f / sums[g];
      for (int64_t j = 0; j < d; ++j) normalized[j] = acc[g * stride + j] * inv;
      detail::matvec_transposed(job.rotation, normalized.data(), out.data(), d);
    } else {
      std::fill(out.begin(), out.end(), 0.f);
    }
    detail::store_from_float(out.data(), d, job.out, job.q_type, rows.vec[g] * d);
  }
}

// Online-softmax attention of the query vectors `rows` over tokens [t_begin, t_end) of sequence s,
// row g seeing only the tokens before rows.limit[g]; leaves acc (rotated domain, not normalized,
// row stride ds), running max and running sum.
// Unpacker: anything with unpack(packed row, floats) (Dequantizer's byte tables, or the
// vector-permutation unpacker on AVX2).
template <typename Unpacker>
TQ_INLINE void attend_range(const AttentionJob& job, int64_t s, int64_t kv_head, const QueryRows& query_rows,
                            int64_t t_begin, int64_t t_end, int64_t ds, const Unpacker& k_unpack,
                            const Unpacker& v_unpack, float* acc, float* running_max, float* running_sum) {
  const PagedCache& c = *job.cache;
  const Dequantizer& kd = *job.k_dequantizer;
  const Dequantizer& vd = *job.v_dequantizer;
  const int64_t d = c.head_dim, hkv = c.num_kv_heads, bsz = c.block_size;
  const int64_t groups = static_cast<int64_t>(query_rows.vec.size());
  std::fill(acc, acc + groups * ds, 0.f);
  std::fill(running_max, running_max + groups, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + groups, 0.f);
  if (t_end <= t_begin) return;

  // q_rot = scale * Pi q, rows padded to ds with zeros, so whatever centroids land in the
  // tiles' padding contribute nothing.
  std::vector<float> q_rot(groups * ds, 0.f), qf(d);
  // key mean: ab[g] = scale * [A; B] of row g
  const bool mean = job.key_mean != nullptr;
  const int64_t half = d / 2;
  std::vector<float> ab(mean ? groups * d : 0), corr(mean ? groups * kChunk : 0);
  for (int64_t g = 0; g < groups; ++g) {
    detail::load_as_float(job.query, job.q_type, query_rows.vec[g] * d, d, qf.data());
    float* qr = q_rot.data() + g * ds;
    detail::matvec(job.rotation, qf.data(), qr, d);
    for (int64_t i = 0; i < d; ++i) qr[i] *= job.scale;
    if (mean) {
      const float* mu = job.key_mean + kv_head * d;
      float* a = ab.data() + g * d;
      for (int64_t j = 0; j < half; ++j) {
        a[j] = job.scale * (qf[j] * mu[j] + qf[j + half] * mu[j + half]);
        a[half + j] = job.scale * (qf[j + half] * mu[j] - qf[j] * mu[j + half]);
      }
    }
  }

  std::vector<float> k_tile(kChunk * ds, 0.f), v_tile(kChunk * ds, 0.f);
  std::vector<float> probs(groups * kChunk), k_norm(kChunk), v_norm(kChunk);
  const int32_t* table = job.block_tables + s * job.max_blocks;

  // Cache rows of a chunk's tokens; the next chunk's rows are prefetched while this one runs
  // (tokens of one head are Hkv rows apart and blocks are scattered: the hardware prefetcher
  // cannot follow).
  std::vector<int64_t> rows(kChunk), next_rows(kChunk);
  auto chunk_rows = [&](int64_t t0, int64_t* out) {
    const int64_t n = std::min(kChunk, t_end - t0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = t0 + i;
      out[i] = (static_cast<int64_t>(table[t / bsz]) * bsz + t % bsz) * hkv + kv_head;
    }
    return n;
  };
  chunk_rows(t_begin, next_rows.data());

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kChunk) {
    const int64_t n = std::min(kChunk, t_end - t0);
    rows.swap(next_rows);
    if (t0 + kChunk < t_end) {
      const int64_t next_n = chunk_rows(t0 + kChunk, next_rows.data());
      for (int64_t i = 0; i < next_n; ++i) {
        detail::prefetch(c.k_codes + next_rows[i] * kd.packed, kd.packed);
        detail::prefetch(c.v_codes + next_rows[i] * vd.packed, vd.packed);
      }
    }
    for (int64_t i = 0; i < n; ++i) {  // unpack the chunk's tokens
      const int64_t row = rows[i];
      k_unpack.unpack(c.k_codes + row * kd.packed, k_tile.data() + i * ds);
      v_unpack.unpack(c.v_codes + row * vd.packed, v_tile.data() + i * ds);
      k_norm[i] = c.norm(c.k_norms, row);
      v_norm[i] = c.norm(c.v_norms, row);
    }

    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) score_heads<4>(q_rot.data() + g * ds, k_tile.data(), n, ds, probs.data() + g * kChunk);
    for (; g < groups; ++g) score_heads<1>(q_rot.data() + g * ds, k_tile.data(), n, ds, probs.data() + g * kChunk);

    if (mean) {  // corr[g][i] = ab[g] . [cos; sin](t * w) of token i: the tile's rows of the table
      const float* rows = job.rope_table + t0 * d;
      if (d % 8 == 0) {
        g = 0;
        for (; g + 4 <= groups; g += 4) score_heads<4>(ab.data() + g * d, rows, n, d, corr.data() + g * kChunk);
        for (; g < groups; ++g) score_heads<1>(ab.data() + g * d, rows, n, d, corr.data() + g * kChunk);
      } else {
        for (g = 0; g < groups; ++g)
          for (int64_t i = 0; i < n; ++i) corr[g * kChunk + i] = detail::dot(ab.data() + g * d, rows + i * d, d);
      }
    }

    for (g = 0; g < groups; ++g) {  // online softmax; probs become weights p * v_norm
      float* p = probs.data() + g * kChunk;
      const int64_t seen = std::clamp<int64_t>(query_rows.limit[g] - t0, 0, n);  // tokens row g sees
      std::fill(p + seen, p + n, 0.f);
      if (seen == 0) continue;
      float chunk_max = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < seen; ++i) {
        p[i] *= k_norm[i];
        if (mean && t0 + i > 0) p[i] += corr[g * kChunk + i];
        chunk_max = std::max(chunk_max, p[i]);
      }
      const float new_max = std::max(running_max[g], chunk_max);
      if (new_max > running_max[g]) {
        const float alpha = std::exp(running_max[g] - new_max);
        running_sum[g] *= alpha;
        float* a = acc + g * ds;
        for (int64_t j = 0; j < ds; ++j) a[j] *= alpha;
        running_max[g] = new_max;
      }
      float sum = 0.f;
      for (int64_t i = 0; i < seen; ++i) {
        const float e = std::exp(p[i] - new_max);
        sum += e;
        p[i] = e * v_norm[i];
      }
      running_sum[g] += sum;
    }

    g = 0;
    for (; g + 8 <= groups; g += 8) accumulate_heads<8>(acc + g * ds, probs.data() + g * kChunk, v_tile.data(), n, ds);
    for (; g + 4 <= groups; g += 4) accumulate_heads<4>(acc + g * ds, probs.data() + g * kChunk, v_tile.data(), n, ds);
    for (; g < groups; ++g) accumulate_heads<1>(acc + g * ds, probs.data() + g * kChunk, v_tile.data(), n, ds);
  }
}

// One task = one (sequence, KV head, split) triple.
template <typename Unpacker>
TQ_INLINE void attention_body(const AttentionJob& job, size_t task, const Unpacker& k_unpack,
                              const Unpacker& v_unpack) {
  const PagedCache& c = *job.cache;
  const int64_t d = c.head_dim, hkv = c.num_kv_heads, groups = job.group;
  const int64_t part = static_cast<int64_t>(task) % job.splits;
  const int64_t pair = static_cast<int64_t>(task) / job.splits;
  const int64_t s = pair / hkv, kv_head = pair % hkv;
  const int64_t ctx_len = std::max<int64_t>(job.context_lens[s], 0);
  const int64_t t_begin = std::min(ctx_len, part * job.split_len);
  const int64_t t_end = std::min(ctx_len, t_begin + job.split_len);

  const int64_t ds = round_up8(std::max({d, job.k_dequantizer->padded_dim(), job.v_dequantizer->padded_dim()}));
  std::vector<float> acc(groups * ds), running_max(groups), running_sum(groups);
  QueryRows rows;
  add_group(job, s, kv_head, t_end, rows);
  attend_range(job, s, kv_head, rows, t_begin, t_end, ds, k_unpack, v_unpack, acc.data(), running_max.data(),
               running_sum.data());
  if (job.splits == 1) {
    write_output(job, rows, acc.data(), ds, running_sum.data());
    return;
  }
  float* partial = job.partial + (pair * job.splits + part) * groups * (d + 2);
  for (int64_t g = 0; g < groups; ++g, partial += d + 2) {
    std::copy(acc.data() + g * ds, acc.data() + g * ds + d, partial);
    partial[d] = running_max[g];
    partial[d + 1] = running_sum[g];
  }
}

// Split-K merge for one (sequence, KV head): rescale each split's state to the global max.
void merge_task(void* ctx, size_t pair) {
  const auto& job = *static_cast<const AttentionJob*>(ctx);
  const int64_t d = job.cache->head_dim, groups = job.group, hkv = job.cache->num_kv_heads;
  const int64_t row = d + 2;
  const float* base = job.partial + static_cast<int64_t>(pair) * job.splits * groups * row;
  std::vector<float> acc(groups * d, 0.f), sums(groups, 0.f);
  for (int64_t g = 0; g < groups; ++g) {
    // the largest running max of the splits that saw tokens (a NaN one wins: it must reach the output)
    float global_max = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < job.splits; ++p) {
      const float* part = base + (p * groups + g) * row;
      if (part[d + 1] != 0.f && !(part[d] <= global_max)) global_max = part[d];
    }
    for (int64_t p = 0; p < job.splits; ++p) {
      const float* part = base + (p * groups + g) * row;
      if (part[d + 1] == 0.f) continue;  // a split with no tokens
      const float w = std::exp(part[d] - global_max);
      sums[g] += part[d + 1] * w;
      for (int64_t j = 0; j < d; ++j) acc[g * d + j] += part[j] * w;
    }
  }
  QueryRows rows;
  add_group(job, static_cast<int64_t>(pair) / hkv, static_cast<int64_t>(pair) % hkv, 0, rows);
  write_output(job, rows, acc.data(), d, sums.data());
}

// One prefill task = one (tile of query rows of a sequence, KV head): row j of the sequence's n
// rows sits at position ctx - n + j and sees position + 1 tokens.
template <typename Unpacker>
TQ_INLINE void prefill_body(const AttentionJob& job, size_t task, const Unpacker& k_unpack,
                            const Unpacker& v_unpack) {
  const PagedCache& c = *job.cache;
  const int64_t hkv = c.num_kv_heads;
  const int64_t tile = static_cast<int64_t>(task) / hkv, kv_head = static_cast<int64_t>(task) % hkv;
  const int64_t s = job.tiles[2 * tile], first_row = job.tiles[2 * tile + 1];
  const int64_t begin = job.query_start[s], n = job.query_start[s + 1] - begin, ctx = job.context_lens[s];
  const int64_t end_row = std::min(first_row + job.rows_per_tile, n);
  QueryRows rows;
  for (int64_t j = first_row; j < end_row; ++j) add_group(job, begin + j, kv_head, ctx - n + j + 1, rows);
  const int64_t t_end = ctx - n + end_row;  // the last row's limit

  const int64_t ds = round_up8(std::max({c.head_dim, job.k_dequantizer->padded_dim(), job.v_dequantizer->padded_dim()}));
  const size_t count = rows.vec.size();
  std::vector<float> acc(count * ds), running_max(count), running_sum(count);
  attend_range(job, s, kv_head, rows, 0, t_end, ds, k_unpack, v_unpack, acc.data(), running_max.data(),
               running_sum.data());
  write_output(job, rows, acc.data(), ds, running_sum.data());
}

struct TableUnpacker {
  const Dequantizer* dq;
  TQ_INLINE void unpack(const uint8_t* p, float* out) const { dq->unpack(p, out); }
};

void attention_task_portable(void* ctx, size_t task) {
  const auto& job = *static_cast<const AttentionJob*>(ctx);
  attention_body(job, task, TableUnpacker{job.k_dequantizer}, TableUnpacker{job.v_dequantizer});
}

void prefill_task_portable(void* ctx, size_t task) {
  const auto& job = *static_cast<const AttentionJob*>(ctx);
  prefill_body(job, task, TableUnpacker{job.k_dequantizer}, TableUnpacker{job.v_dequantizer});
}

// Explicit AVX2 + FMA variant (picked at run time): vector unpacking needs vpermps.
#if defined(TQ_HAVE_VECTOR_UNPACK) && defined(__x86_64__)
#define TQ_HAVE_AVX2_ATTENTION 1
__attribute__((target("avx2,fma"))) void attention_task_avx2(void* ctx, size_t task) {
  const auto& job = *static_cast<const AttentionJob*>(ctx);
  const detail::VectorUnpacker k_unpack(*job.k_dequantizer), v_unpack(*job.v_dequantizer);
  attention_body(job, task, k_unpack, v_unpack);
}

__attribute__((target("avx2,fma"))) void prefill_task_avx2(void* ctx, size_t task) {
  const auto& job = *static_cast<const AttentionJob*>(ctx);
  const detail::VectorUnpacker k_unpack(*job.k_dequantizer), v_unpack(*job.v_dequantizer);
  prefill_body(job, task, k_unpack, v_unpack);
}
#endif

// TQ_DEPLOY_CPU_KERNELS=portable forces the portable path (tests cover both paths with it).
bool use_avx2() {
#if defined(TQ_HAVE_AVX2_ATTENTION)
  static const bool avx2 = [] {
    const char* choice = std::getenv("TQ_DEPLOY_CPU_KERNELS");
    if (choice != nullptr && std::strcmp(choice, "portable") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

Parallel::Task attention_task() {
#if defined(TQ_HAVE_AVX2_ATTENTION)
  if (use_avx2()) return attention_task_avx2;
#endif
  return attention_task_portable;
}

Parallel::Task prefill_task() {
#if defined(TQ_HAVE_AVX2_ATTENTION)
  if (use_avx2()) return prefill_task_avx2;
#endif
  return prefill_task_portable;
}

// The read-only cache of an attention call (PagedCache's pointers are mutable for the cache
// update's sake).
template <typename Call>
PagedCache cache_of(const Call& c) {
  return PagedCache{const_cast<uint8_t*>(c.k_codes), const_cast<void*>(c.k_norms), const_cast<uint8_t*>(c.v_codes),
                    const_cast<void*>(c.v_norms), c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim, c.k_bits,
                    c.v_bits, c.norm_dtype == TQ_FLOAT16};
}

// The softmax scale: the attribute, or 1/sqrt(D) for 0.
template <typename Call>
float scale_of(const Call& c) {
  return c.scale > 0.f ? c.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
}

}  // namespace

void paged_attention(const tq_paged_attention_call& c, const Parallel& parallel) {
  const PagedCache cache = cache_of(c);
  const int64_t num_seqs = c.num_seqs, num_q_heads = c.num_q_heads, max_blocks = c.max_blocks;
  const int32_t* block_tables = c.block_tables;
  const int32_t* context_lens = c.context_lens;
  const Dequantizer kd(c.k_codebook, cache.k_bits, cache.head_dim);
  const Dequantizer vd(c.v_codebook, cache.v_bits, cache.head_dim);
  const float used_scale = scale_of(c);
  const int64_t group = num_q_heads / cache.num_kv_heads;
  const int64_t pairs = num_seqs * cache.num_kv_heads;

  // Split long contexts when there are too few (sequence, KV head) pairs to keep the threads
  // busy: at least kMinSplitTokens per split, up to kTargetTasks tasks. The split depends only
  // on the shapes, never on the thread count, so results are reproducible.
  constexpr int64_t kTargetTasks = 64, kMinSplitTokens = 512;
  int64_t max_ctx = 0;
  for (int64_t s = 0; s < num_seqs; ++s) max_ctx = std::max<int64_t>(max_ctx, context_lens[s]);
  int64_t splits = 1;
  if (pairs > 0 && pairs < kTargetTasks) {
    splits = std::min((kTargetTasks + pairs - 1) / pairs, (max_ctx + kMinSplitTokens - 1) / kMinSplitTokens);
    splits = std::max<int64_t>(splits, 1);
  }
  int64_t split_len = std::max<int64_t>(max_ctx, 1);
  if (splits > 1) split_len = ((max_ctx + splits - 1) / splits + kChunk - 1) / kChunk * kChunk;
  std::vector<float> partial(splits > 1 ? static_cast<size_t>(pairs * splits * group * (cache.head_dim + 2)) : 0);

  AttentionJob job{c.query, static_cast<DType>(c.dtype), num_q_heads, group, &cache, block_tables, max_blocks,
                   context_lens, c.rotation, &kd, &vd, used_scale, c.out, splits, split_len, partial.data(),
                   nullptr, 0, nullptr, c.key_mean, nullptr};
  std::shared_ptr<const std::vector<float>> table;
  if (c.key_mean != nullptr) {
    table = RopeTable::get(c.rope_inv_freq, cache.head_dim / 2, max_ctx, parallel);
    job.rope_table = table->data();
  }
  parallel.for_each(static_cast<size_t>(pairs * splits), attention_task(), &job);
  if (splits > 1) parallel.for_each(static_cast<size_t>(pairs), merge_task, &job);
}

void paged_prefill(const tq_paged_prefill_call& c, const Parallel& parallel) {
  const PagedCache cache = cache_of(c);
  const Dequantizer kd(c.k_codebook, cache.k_bits, cache.head_dim);
  const Dequantizer vd(c.v_codebook, cache.v_bits, cache.head_dim);
  const int64_t group = c.num_q_heads / cache.num_kv_heads;
  // About 48 query vectors per task share each unpacked tile (a sequence's rows times the group).
  const int64_t rows_per_tile = std::max<int64_t>(1, 48 / group);
  std::vector<int64_t> tiles;
  for (int64_t s = 0; s < c.num_seqs; ++s)
    for (int64_t j = 0; j < c.query_start[s + 1] - c.query_start[s]; j += rows_per_tile) {
      tiles.push_back(s);
      tiles.push_back(j);
    }
  AttentionJob job{c.query, static_cast<DType>(c.dtype), c.num_q_heads, group, &cache, c.block_tables,
                   c.max_blocks, c.context_lens, c.rotation, &kd, &vd, scale_of(c), c.out, 1, 0, nullptr,
                   c.query_start, rows_per_tile, tiles.data(), c.key_mean, nullptr};
  std::shared_ptr<const std::vector<float>> table;
  if (c.key_mean != nullptr) {
    int64_t max_ctx = 0;
    for (int64_t s = 0; s < c.num_seqs; ++s) max_ctx = std::max<int64_t>(max_ctx, c.context_lens[s]);
    table = RopeTable::get(c.rope_inv_freq, cache.head_dim / 2, max_ctx, parallel);
    job.rope_table = table->data();
  }
  parallel.for_each(tiles.size() / 2 * static_cast<size_t>(cache.num_kv_heads), prefill_task(), &job);
}

}  // namespace tq
