// TQPagedAttention as a TensorRT IPluginV3 (tq_deploy/ops.py: PAGED_ATTENTION) over
// tq_cuda_paged_attention, its split-K workspace from getWorkspaceSize.
#include "tq_cuda.h"
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::IExprBuilder;

const OpDef kPagedAttentionDef = op_def(tq_ops::paged_attention::kOp);

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

// The workspace of the largest shapes of the profile serves every smaller call (tq_cuda.h).
size_t PagedAttentionPlugin::workspace_bytes(const nvinfer1::DynamicPluginTensorDesc* in) const {
  const Dims &q = in[0].max, &k_codes = in[1].max, &tables = in[5].max;
  return tq_cuda_paged_attention_workspace(q.d[0], q.d[1], k_codes.d[2], q.d[2], tables.d[1], k_codes.d[1],
                                           attrs_.get_int(0), attrs_.get_int(1), 0);
}

int PagedAttentionPlugin::run(const nvinfer1::PluginTensorDesc* d, const void* const* in, void* const* out,
                              void* workspace, cudaStream_t stream) {
  const Dims &q = d[0].dims, &k_codes = d[1].dims, &tables = d[5].dims;
  const size_t bytes = tq_cuda_paged_attention_workspace(q.d[0], q.d[1], k_codes.d[2], q.d[2], tables.d[1],
                                                         k_codes.d[1], attrs_.get_int(0), attrs_.get_int(1), 0);
  return tq_cuda_paged_attention(
      in[0], float_type(d[0].type), q.d[0], q.d[1], k_codes.d[2], q.d[2], static_cast<const uint8_t*>(in[1]),
      static_cast<const float*>(in[2]), static_cast<const uint8_t*>(in[3]), static_cast<const float*>(in[4]),
      k_codes.d[0], k_codes.d[1], static_cast<const int32_t*>(in[5]), tables.d[1], static_cast<const int32_t*>(in[6]),
      static_cast<const float*>(in[7]), static_cast<const float*>(in[8]), static_cast<const float*>(in[9]),
      attrs_.get_int(0), attrs_.get_int(1), attrs_.get_float(2), 0, workspace, bytes, out[0], stream);
}

}  // namespace tq_trt
