// TQDecode as a TensorRT IPluginV3 (tq_deploy/ops.py: DECODE) over tq_cuda_decode.
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

namespace op = tq_ops::decode;

// ---- TQDecode: codes [..., P], norms [...], rotation [D, D], codebook [K] -> x_hat [..., D]
bool DecodePlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder&) const {
  if (in[op::kCodes].nbDims < 1 || in[op::kRotation].nbDims != 2) return false;
  leading_then(in[op::kCodes], in[op::kRotation].d[0], out[op::kXHat]);
  return true;
}

std::string DecodePlugin::check_shapes(const Dims* in, int32_t) const {
  const Dims &codes = in[op::kCodes], &norms = in[op::kNorms], &rotation = in[op::kRotation];
  if (codes.nbDims < 1) return "codes has rank 0, expected >= 1";
  const int bits = attrs_.get_int(op::kBits);
  const int64_t dim = known({rotation.d[0], rotation.d[1]});
  std::string problem = first_problem({expect_rank("norms", norms, codes.nbDims - 1),
                                       expect_dim("codes", codes, codes.nbDims - 1, packed(dim, bits),
                                                  "ceil(head_dim * bits / 8)"),
                                       check_rotation_codebook(rotation, dim, in[op::kCodebook], "codebook", bits)});
  for (int32_t i = 0; problem.empty() && i + 1 < codes.nbDims; ++i)
    problem = expect_dim("norms", norms, i, codes.d[i], "the leading dims of codes");
  return problem;
}

}  // namespace tq_trt
