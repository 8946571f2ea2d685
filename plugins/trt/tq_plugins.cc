// The four TurboQuant plugins: op tables (inputs/outputs/attributes as in tq_deploy/ops.py),
// output shape expressions, shape checks and enqueue through the CUDA launchers of tq_cuda.h.
#include "tq_plugins.h"

#include <initializer_list>

#include "tq_cuda.h"

namespace tq_trt {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::IExprBuilder;

const OpDef kEncodeDef{"TQEncode", {{"bits", false, true}}, {kT, kF32, kF32}, {kU8, kF32}};
const OpDef kDecodeDef{"TQDecode", {{"bits", false, true}}, {kU8, kF32, kF32, kF32}, {kF32}};
const OpDef kCacheUpdateDef{"TQCacheUpdate",
                            {{"k_bits", false, true}, {"v_bits", false, true}},
                            {kT, kT, kI64, kU8, kF32, kU8, kF32, kF32, kF32, kF32},
                            {kU8, kF32, kU8, kF32}};
const OpDef kPagedAttentionDef{"TQPagedAttention",
                               {{"k_bits", false, true}, {"v_bits", false, true}, {"scale", true, false}},
                               {kT, kU8, kF32, kU8, kF32, kI32, kI32, kF32, kF32, kF32},
                               {kT}};

namespace {

int64_t packed(int64_t dim, int bits) { return dim < 0 ? -1 : (dim * bits + 7) / 8; }

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
  return first_problem({expect_rank(c.c_str(), codes, 4), expect_rank(n.c_str(), norms, 3),
                        expect_dim(c.c_str(), codes, 0, ref_codes.d[0], "num_blocks of k_codes"),
                        expect_dim(c.c_str(), codes, 1, ref_codes.d[1], "block_size of k_codes"),
                        expect_dim(c.c_str(), codes, 2, hkv, "num_kv_heads"),
                        expect_dim(c.c_str(), codes, 3, packed(dim, bits), "ceil(head_dim * bits / 8)"),
                        expect_dim(n.c_str(), norms, 0, ref_codes.d[0], "num_blocks"),
                        expect_dim(n.c_str(), norms, 1, ref_codes.d[1], "block_size"),
                        expect_dim(n.c_str(), norms, 2, hkv, "num_kv_heads")});
}

tq_cuda_dtype float_type(DataType t) { return t == DataType::kHALF ? TQ_CUDA_FLOAT16 : TQ_CUDA_FLOAT32; }

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

}  // namespace

// ---- TQEncode: x [..., D], rotation [D, D], codebook [K] -> codes [..., P], norms [...]
bool EncodePlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder& b) const {
  if (in[0].nbDims < 1) return false;
  const int bits = attrs_.get_int(0);
  const nvinfer1::IDimensionExpr* dim = in[0].d[in[0].nbDims - 1];
  const nvinfer1::IDimensionExpr* p =
      dim->isConstant() ? b.constant(packed(dim->getConstantValue(), bits))
                        : b.operation(nvinfer1::DimensionOperation::kCEIL_DIV,
                                      *b.operation(nvinfer1::DimensionOperation::kPROD, *dim, *b.constant(bits)),
                                      *b.constant(8));
  leading_then(in[0], p, out[0]);
  leading_only(in[0], out[1]);
  return true;
}

std::string EncodePlugin::check_shapes(const Dims* in) const {
  if (in[0].nbDims < 1) return "x has rank 0, expected >= 1";
  const int64_t dim = known({in[0].d[in[0].nbDims - 1], in[1].d[0], in[1].d[1]});
  return check_rotation_codebook(in[1], dim, in[2], "codebook", attrs_.get_int(0));
}

int EncodePlugin::run(const nvinfer1::PluginTensorDesc* d, const void* const* in, void* const* out,
                      cudaStream_t stream) {
  const int64_t dim = d[0].dims.d[d[0].dims.nbDims - 1];
  const int64_t rows = dim > 0 ? volume(d[0].dims) / dim : 0;
  return tq_cuda_encode(in[0], float_type(d[0].type), rows, dim, static_cast<const float*>(in[1]),
                        static_cast<const float*>(in[2]), attrs_.get_int(0), static_cast<uint8_t*>(out[0]),
                        static_cast<float*>(out[1]), stream);
}

// ---- TQDecode: codes [..., P], norms [...], rotation [D, D], codebook [K] -> x_hat [..., D]
bool DecodePlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder&) const {
  if (in[0].nbDims < 1 || in[2].nbDims != 2) return false;
  leading_then(in[0], in[2].d[0], out[0]);
  return true;
}

std::string DecodePlugin::check_shapes(const Dims* in) const {
  if (in[0].nbDims < 1) return "codes has rank 0, expected >= 1";
  const int bits = attrs_.get_int(0);
  const int64_t dim = known({in[2].d[0], in[2].d[1]});
  std::string problem = first_problem({expect_rank("norms", in[1], in[0].nbDims - 1),
                                       expect_dim("codes", in[0], in[0].nbDims - 1, packed(dim, bits),
                                                  "ceil(head_dim * bits / 8)"),
                                       check_rotation_codebook(in[2], dim, in[3], "codebook", bits)});
  for (int32_t i = 0; problem.empty() && i + 1 < in[0].nbDims; ++i)
    problem = expect_dim("norms", in[1], i, in[0].d[i], "the leading dims of codes");
  return problem;
}

int DecodePlugin::run(const nvinfer1::PluginTensorDesc* d, const void* const* in, void* const* out,
                      cudaStream_t stream) {
  const int64_t dim = d[2].dims.d[0];
  return tq_cuda_decode(static_cast<const uint8_t*>(in[0]), static_cast<const float*>(in[1]), volume(d[1].dims), dim,
                        static_cast<const float*>(in[2]), static_cast<const float*>(in[3]), attrs_.get_int(0),
                        static_cast<float*>(out[0]), stream);
}

// ---- TQCacheUpdate: key, value [T, Hkv, D], slot_mapping [T], caches, rotation, codebooks -> caches
bool CacheUpdatePlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder&) const {
  for (int32_t o = 0; o < 4; ++o) out[o] = in[3 + o];
  return true;
}

std::string CacheUpdatePlugin::check_shapes(const Dims* in) const {
  const int k_bits = attrs_.get_int(0), v_bits = attrs_.get_int(1);
  const Dims &key = in[0], &value = in[1], &slots = in[2];
  std::string problem = first_problem({expect_rank("key", key, 3), expect_rank("value", value, 3),
                                       expect_rank("slot_mapping", slots, 1)});
  if (!problem.empty()) return problem;
  const int64_t dim = known({key.d[2], value.d[2], in[7].d[0]});
  const int64_t hkv = known({key.d[1], value.d[1], in[3].nbDims == 4 ? in[3].d[2] : -1});
  return first_problem({expect_dim("value", value, 0, key.d[0], "num_tokens of key"),
                        expect_dim("value", value, 1, hkv, "num_kv_heads"),
                        expect_dim("key", key, 1, hkv, "num_kv_heads"),
                        expect_dim("value", value, 2, dim, "head_dim"), expect_dim("key", key, 2, dim, "head_dim"),
                        expect_dim("slot_mapping", slots, 0, key.d[0], "num_tokens of key"),
                        check_cache(in[3], in[4], in[3], hkv, dim, k_bits, "k"),
                        check_cache(in[5], in[6], in[3], hkv, dim, v_bits, "v"),
                        check_rotation_codebook(in[7], dim, in[8], "k_codebook", k_bits),
                        check_rotation_codebook(in[7], dim, in[9], "v_codebook", v_bits)});
}

int CacheUpdatePlugin::run(const nvinfer1::PluginTensorDesc* d, const void* const* in, void* const* out,
                           cudaStream_t stream) {
  // Outputs alias inputs 3..6 when TensorRT honours getAliasedInput; otherwise start from a copy.
  for (int o = 0; o < 4; ++o) {
    if (out[o] == in[3 + o]) continue;
    const size_t bytes = static_cast<size_t>(volume(d[3 + o].dims) * element_size(d[3 + o].type));
    if (cudaError_t rc = cudaMemcpyAsync(out[o], in[3 + o], bytes, cudaMemcpyDeviceToDevice, stream))
      return static_cast<int>(rc);
  }
  const Dims& key = d[0].dims;
  const Dims& k_codes = d[3].dims;
  return tq_cuda_cache_update(in[0], in[1], float_type(d[0].type), static_cast<const int64_t*>(in[2]), key.d[0],
                              key.d[1], key.d[2], static_cast<uint8_t*>(out[0]), static_cast<float*>(out[1]),
                              static_cast<uint8_t*>(out[2]), static_cast<float*>(out[3]), k_codes.d[0], k_codes.d[1],
                              static_cast<const float*>(in[7]), static_cast<const float*>(in[8]),
                              static_cast<const float*>(in[9]), attrs_.get_int(0), attrs_.get_int(1), stream);
}

// ---- TQPagedAttention: query [S, Hq, D], caches, block_tables [S, M], context_lens [S], ... -> out [S, Hq, D]
bool PagedAttentionPlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder&) const {
  if (in[0].nbDims != 3) return false;
  out[0] = in[0];
  return true;
}

std::string PagedAttentionPlugin::check_shapes(const Dims* in) const {
  const int k_bits = attrs_.get_int(0), v_bits = attrs_.get_int(1);
  const Dims &q = in[0], &k_codes = in[1], &tables = in[5], &lens = in[6];
  std::string problem = first_problem({expect_rank("query", q, 3), expect_rank("k_codes", k_codes, 4),
                                       expect_rank("block_tables", tables, 2), expect_rank("context_lens", lens, 1)});
  if (!problem.empty()) return problem;
  const int64_t dim = known({q.d[2], in[7].d[0]});
  const int64_t hkv = k_codes.d[2];
  if (q.d[1] >= 0 && hkv > 0 && q.d[1] % hkv != 0)
    return "query.shape[1]=" + std::to_string(q.d[1]) + " query heads, expected a multiple of num_kv_heads=" +
           std::to_string(hkv);
  return first_problem({expect_dim("query", q, 2, dim, "head_dim"),
                        check_cache(in[1], in[2], k_codes, hkv, dim, k_bits, "k"),
                        check_cache(in[3], in[4], k_codes, hkv, dim, v_bits, "v"),
                        expect_dim("block_tables", tables, 0, q.d[0], "num_seqs of query"),
                        expect_dim("context_lens", lens, 0, q.d[0], "num_seqs of query"),
                        check_rotation_codebook(in[7], dim, in[8], "k_codebook", k_bits),
                        check_rotation_codebook(in[7], dim, in[9], "v_codebook", v_bits)});
}

int PagedAttentionPlugin::run(const nvinfer1::PluginTensorDesc* d, const void* const* in, void* const* out,
                              cudaStream_t stream) {
  const Dims &q = d[0].dims, &k_codes = d[1].dims, &tables = d[5].dims;
  return tq_cuda_paged_attention(
      in[0], float_type(d[0].type), q.d[0], q.d[1], k_codes.d[2], q.d[2], static_cast<const uint8_t*>(in[1]),
      static_cast<const float*>(in[2]), static_cast<const uint8_t*>(in[3]), static_cast<const float*>(in[4]),
      k_codes.d[0], k_codes.d[1], static_cast<const int32_t*>(in[5]), tables.d[1], static_cast<const int32_t*>(in[6]),
      static_cast<const float*>(in[7]), static_cast<const float*>(in[8]), static_cast<const float*>(in[9]),
      attrs_.get_int(0), attrs_.get_int(1), attrs_.get_float(2), out[0], stream);
}

}  // namespace tq_trt
