// TQEncode as a TensorRT IPluginV3 (tq_deploy/ops.py: ENCODE) over tq_cuda_encode.
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

namespace op = tq_ops::encode;

// ---- TQEncode: x [..., D], rotation [D, D], codebook [K] -> codes [..., P], norms [...]
bool EncodePlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder& b) const {
  const DimsExprs& x = in[op::kX];
  if (x.nbDims < 1) return false;
  const int bits = attrs_.get_int(op::kBits);
  const nvinfer1::IDimensionExpr* dim = x.d[x.nbDims - 1];
  const nvinfer1::IDimensionExpr* p =
      dim->isConstant() ? b.constant(packed(dim->getConstantValue(), bits))
                        : b.operation(nvinfer1::DimensionOperation::kCEIL_DIV,
                                      *b.operation(nvinfer1::DimensionOperation::kPROD, *dim, *b.constant(bits)),
                                      *b.constant(8));
  leading_then(x, p, out[op::kCodes]);
  leading_only(x, out[op::kNorms]);
  return true;
}

std::string EncodePlugin::check_shapes(const Dims* in, int32_t) const {
  const Dims &x = in[op::kX], &rotation = in[op::kRotation];
  if (x.nbDims < 1) return "x has rank 0, expected >= 1";
  const int64_t dim = known({x.d[x.nbDims - 1], rotation.d[0], rotation.d[1]});
  return check_rotation_codebook(rotation, dim, in[op::kCodebook], "codebook", attrs_.get_int(op::kBits));
}

}  // namespace tq_trt
