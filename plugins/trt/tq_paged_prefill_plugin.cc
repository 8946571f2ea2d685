// TQPagedPrefill as a TensorRT IPluginV3 (tq_deploy/ops.py: PAGED_PREFILL) over tq_cuda_paged_prefill.
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

namespace op = tq_ops::paged_prefill;

// ---- TQPagedPrefill: query [T, Hq, D], caches, block_tables [S, M], context_lens [S],
//      query_start [S+1], ... -> out [T, Hq, D]
bool PagedPrefillPlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder&) const {
  return like_query(in[op::kQuery], out[op::kOut]);
}

std::string PagedPrefillPlugin::check_shapes(const Dims* in, int32_t nb_inputs) const {
  const Dims &tables = in[op::kBlockTables], &starts = in[op::kQueryStart];
  std::string problem = check_paged_shapes(in[op::kQuery], false, in + op::kKCodes, tables, in[op::kContextLens],
                                           in[op::kRotation], in[op::kKCodebook], in[op::kVCodebook],
                                           attrs_.get_int(op::kKBits), attrs_.get_int(op::kVBits));
  if (problem.empty()) problem = expect_rank("query_start", starts, 1);
  if (problem.empty() && tables.nbDims == 2)
    problem = expect_dim("query_start", starts, 0, tables.d[0] < 0 ? -1 : tables.d[0] + 1, "num_seqs + 1");
  if (problem.empty()) problem = check_key_mean_shapes(in, nb_inputs, op::kKeyMean, in[op::kQuery], in[op::kKCodes]);
  return problem;
}

}  // namespace tq_trt
