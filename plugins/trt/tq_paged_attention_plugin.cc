// TQPagedAttention as a TensorRT IPluginV3 (tq_deploy/ops.py: PAGED_ATTENTION) over the planned
// tq_cuda_paged_attention: its split-K workspace from getWorkspaceSize, a plan per shape.
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

namespace op = tq_ops::paged_attention;

// ---- TQPagedAttention: query [S, Hq, D], caches, block_tables [S, M], context_lens [S], ... -> out [S, Hq, D]
bool PagedAttentionPlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder&) const {
  return like_query(in[op::kQuery], out[op::kOut]);
}

std::string PagedAttentionPlugin::check_shapes(const Dims* in, int32_t nb_inputs) const {
  const std::string problem =
      check_paged_shapes(in[op::kQuery], true, in + op::kKCodes, in[op::kBlockTables], in[op::kContextLens],
                         in[op::kRotation], in[op::kKCodebook], in[op::kVCodebook], attrs_.get_int(op::kKBits),
                         attrs_.get_int(op::kVBits));
  return problem.empty() ? check_key_mean_shapes(in, nb_inputs, op::kKeyMean, in[op::kQuery], in[op::kKCodes])
                         : problem;
}

}  // namespace tq_trt
