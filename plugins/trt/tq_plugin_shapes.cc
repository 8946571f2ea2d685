#include "tq_plugin_shapes.h"

#include "tq_cuda.h"

namespace tq_trt {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;

std::string first_problem(std::initializer_list<std::string> checks) {
  for (const std::string& c : checks)
    if (!c.empty()) return c;
  return "";
}

// The first known value among dims (-1 when all are unknown).
int64_t known(std::initializer_list<int64_t> dims) {
  for (int64_t d : dims)
    if (d >= 0) return d;
  return -1;
}

std::string check_rotation_codebook(const Dims& rotation, int64_t dim, const Dims& codebook, const char* codebook_name,
                                    int bits) {
  return first_problem({expect_rank("rotation", rotation, 2), expect_rank(codebook_name, codebook, 1),
                        expect_dim("rotation", rotation, 0, dim, "head_dim"),
                        expect_dim("rotation", rotation, 1, dim, "head_dim"),
                        expect_dim(codebook_name, codebook, 0, int64_t{1} << bits, "2**bits")});
}

// Checks a paged cache (codes [N, B, Hkv, P], norms [N, B, Hkv]) of `what` ("k" or "v").
std::string check_cache(const Dims& codes, const Dims& norms, const Dims& ref_codes, int64_t hkv, int64_t dim,
                        int bits, const std::string& what) {
  const std::string c = what + "_codes", n = what + "_norms";
  // a known head count of 0 leaves nothing to attend or store: refused here, before any enqueue
  if (codes.nbDims == 4 && codes.d[2] == 0)
    return c + ".shape[2]=0 num_kv_heads, expected >= 1";
  return first_problem({expect_rank(c.c_str(), codes, 4), expect_rank(n.c_str(), norms, 3),
                        expect_dim(c.c_str(), codes, 0, ref_codes.d[0], "num_blocks of k_codes"),
                        expect_dim(c.c_str(), codes, 1, ref_codes.d[1], "block_size of k_codes"),
                        expect_dim(c.c_str(), codes, 2, hkv, "num_kv_heads"),
                        expect_dim(c.c_str(), codes, 3, packed(dim, bits), "ceil(head_dim * bits / 8)"),
                        expect_dim(n.c_str(), norms, 0, ref_codes.d[0], "num_blocks"),
                        expect_dim(n.c_str(), norms, 1, ref_codes.d[1], "block_size"),
                        expect_dim(n.c_str(), norms, 2, hkv, "num_kv_heads")});
}

std::string check_paged_shapes(const Dims& q, bool rows_are_seqs, const Dims* cache, const Dims& tables,
                               const Dims& lens, const Dims& rotation, const Dims& k_codebook, const Dims& v_codebook,
                               int k_bits, int v_bits) {
  const Dims& k_codes = cache[0];
  std::string problem = first_problem({expect_rank("query", q, 3), expect_rank("k_codes", k_codes, 4),
                                       expect_rank("block_tables", tables, 2), expect_rank("context_lens", lens, 1)});
  if (!problem.empty()) return problem;
  const int64_t dim = known({q.d[2], rotation.d[0]});
  const int64_t hkv = k_codes.d[2];
  if (q.d[1] >= 0 && hkv > 0 && q.d[1] % hkv != 0)
    return "query.shape[1]=" + std::to_string(q.d[1]) + " query heads, expected a multiple of num_kv_heads=" +
           std::to_string(hkv);
  const int64_t seqs = rows_are_seqs ? q.d[0] : tables.d[0];
  const char* seqs_what = rows_are_seqs ? "num_seqs of query" : "num_seqs of block_tables";
  return first_problem({expect_dim("query", q, 2, dim, "head_dim"),
                        check_cache(cache[0], cache[1], k_codes, hkv, dim, k_bits, "k"),
                        check_cache(cache[2], cache[3], k_codes, hkv, dim, v_bits, "v"),
                        expect_dim("block_tables", tables, 0, seqs, seqs_what),
                        expect_dim("context_lens", lens, 0, seqs, seqs_what),
                        check_rotation_codebook(rotation, dim, k_codebook, "k_codebook", k_bits),
                        check_rotation_codebook(rotation, dim, v_codebook, "v_codebook", v_bits)});
}

std::string check_key_mean_shapes(const Dims* in, int32_t nb_inputs, int32_t key_mean, const Dims& query,
                                  const Dims& k_codes) {
  if (nb_inputs <= key_mean) return "";
  if (nb_inputs == key_mean + 1) return "key_mean is given without rope_inv_freq, expected both or neither";
  const Dims &mean = in[key_mean], &rates = in[key_mean + 1];
  const int64_t dim = query.nbDims == 3 ? query.d[2] : -1;
  std::string problem = first_problem({expect_rank("key_mean", mean, 2), expect_rank("rope_inv_freq", rates, 1)});
  if (!problem.empty()) return problem;
  if (dim > 0 && dim % 2 != 0)
    return "rope_inv_freq is given with head_dim=" + std::to_string(dim) + ", expected an even head_dim";
  return first_problem({expect_dim("key_mean", mean, 0, k_codes.nbDims == 4 ? k_codes.d[2] : -1, "num_kv_heads"),
                        expect_dim("key_mean", mean, 1, dim, "head_dim"),
                        expect_dim("rope_inv_freq", rates, 0, dim < 0 ? -1 : dim / 2, "head_dim / 2")});
}

tq_cuda_dtype float_type(DataType t) { return t == DataType::kHALF ? TQ_CUDA_FLOAT16 : TQ_CUDA_FLOAT32; }

bool like_query(const DimsExprs& query, DimsExprs& out) {
  if (query.nbDims != 3) return false;
  out = query;
  return true;
}

// codes-like dims: leading dims of `src` then `last`.
void leading_then(const DimsExprs& src, const nvinfer1::IDimensionExpr* last, DimsExprs& out) {
  out.nbDims = src.nbDims;
  for (int32_t i = 0; i + 1 < src.nbDims; ++i) out.d[i] = src.d[i];
  out.d[src.nbDims - 1] = last;
}

void leading_only(const DimsExprs& src, DimsExprs& out) {
  out.nbDims = src.nbDims - 1;
  for (int32_t i = 0; i + 1 < src.nbDims; ++i) out.d[i] = src.d[i];
}

}  // namespace tq_trt
