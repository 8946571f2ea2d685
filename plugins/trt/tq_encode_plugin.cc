// TQEncode as a TensorRT IPluginV3 (tq_deploy/ops.py: ENCODE) over tq_cuda_encode.
#include "tq_cuda.h"
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::IExprBuilder;

const OpDef kEncodeDef = op_def(tq_ops::encode::kOp);

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

int EncodePlugin::run(const nvinfer1::PluginTensorDesc* d, const void* const* in, void* const* out, void*,
                      cudaStream_t stream) {
  const int64_t dim = d[0].dims.d[d[0].dims.nbDims - 1];
  const int64_t rows = dim > 0 ? volume(d[0].dims) / dim : 0;
  return tq_cuda_encode(in[0], float_type(d[0].type), rows, dim, static_cast<const float*>(in[1]),
                        static_cast<const float*>(in[2]), attrs_.get_int(0), static_cast<uint8_t*>(out[0]),
                        static_cast<float*>(out[1]), stream);
}

}  // namespace tq_trt
