// TQDecode as a TensorRT IPluginV3 (tq_deploy/ops.py: DECODE) over tq_cuda_decode.
#include "tq_cuda.h"
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::IExprBuilder;

const OpDef kDecodeDef = op_def(tq_ops::decode::kOp);

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

int DecodePlugin::run(const nvinfer1::PluginTensorDesc* d, const void* const* in, void* const* out, void*,
                      cudaStream_t stream) {
  const int64_t dim = d[2].dims.d[0];
  return tq_cuda_decode(static_cast<const uint8_t*>(in[0]), static_cast<const float*>(in[1]), volume(d[1].dims), dim,
                        static_cast<const float*>(in[2]), static_cast<const float*>(in[3]), attrs_.get_int(0),
                        static_cast<float*>(out[0]), stream);
}

}  // namespace tq_trt
