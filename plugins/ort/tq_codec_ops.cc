// TQEncode and TQDecode (tq_deploy/ops.py: ENCODE, DECODE).
#include "ort_op_base.h"
#include "tq_checks.h"

namespace tq_ort {
namespace {

int64_t product(const std::vector<int64_t>& shape, size_t end) {
  int64_t n = 1;
  for (size_t i = 0; i < end; ++i) n *= shape[i];
  return n;
}

// codes, norms = TQEncode(x[..., D], rotation[D, D], codebook[2**bits])
struct EncodeKernel : KernelBase<EncodeKernel> {
  static constexpr const char* kName = "TQEncode";
  static const std::vector<IoSpec>& inputs() {
    static const std::vector<IoSpec> v{{"x", kTypeT},
                                       {"rotation", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
                                       {"codebook", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}};
    return v;
  }
  static const std::vector<IoSpec>& outputs() {
    static const std::vector<IoSpec> v{{"codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
                                       {"norms", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}};
    return v;
  }

  EncodeKernel(const OrtKernelInfo* info, ONNXTensorElementDataType float_type)
      : float_type_(float_type), bits_(checked_bits(info, kName, "bits")) {}

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kName, inputs(), float_type_);
    Input x = io.input(0);
    Input rotation = io.input(1);
    Input codebook = io.input(2);
    if (x.shape.empty()) fail(kName, "input x is a scalar, expected shape [..., D]");
    check_rotation(io, rotation);
    io.dims().bind("D", x.shape.back(), "x", x.shape.size() - 1);
    check_codebook(io, codebook, bits_, "bits");

    const int64_t dim = io.dims().get("D");
    const int64_t rows = product(x.shape, x.shape.size() - 1);
    std::vector<int64_t> lead(x.shape.begin(), x.shape.end() - 1);
    std::vector<int64_t> codes_shape = lead;
    codes_shape.push_back(tq::packed_size(dim, static_cast<int>(bits_)));
    auto codes = io.output(0, codes_shape);
    auto norms = io.output(1, lead);
    if (rows == 0) return;
    tq::encode(x.value.GetTensorRawData(), to_dtype(float_type_), rows, dim, rotation.data<float>(),
               codebook.data<float>(), static_cast<int>(bits_), codes.GetTensorMutableData<uint8_t>(),
               norms.GetTensorMutableData<float>(), io.parallel());
  }

  ONNXTensorElementDataType float_type_;
  int64_t bits_;
};

// x_hat = TQDecode(codes[..., P], norms[...], rotation[D, D], codebook[2**bits])
struct DecodeKernel : KernelBase<DecodeKernel> {
  static constexpr const char* kName = "TQDecode";
  static const std::vector<IoSpec>& inputs() {
    static const std::vector<IoSpec> v{{"codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
                                       {"norms", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
                                       {"rotation", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
                                       {"codebook", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}};
    return v;
  }
  static const std::vector<IoSpec>& outputs() {
    static const std::vector<IoSpec> v{{"x_hat", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}};
    return v;
  }

  DecodeKernel(const OrtKernelInfo* info, ONNXTensorElementDataType float_type)
      : float_type_(float_type), bits_(checked_bits(info, kName, "bits")) {}

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kName, inputs(), float_type_);
    Input codes = io.input(0);
    Input norms = io.input(1);
    Input rotation = io.input(2);
    Input codebook = io.input(3);
    check_rotation(io, rotation);
    check_codebook(io, codebook, bits_, "bits");
    const int64_t dim = io.dims().get("D");
    const int64_t packed = tq::packed_size(dim, static_cast<int>(bits_));
    if (codes.shape.empty() || codes.shape.back() != packed) {
      std::ostringstream msg;
      msg << "input codes has shape " << shape_str(codes.shape) << ", expected [..., " << packed
          << "] (P = ceil(D * bits / 8) with D=" << dim << " from rotation, bits=" << bits_ << ")";
      fail(kName, msg.str());
    }
    std::vector<int64_t> lead(codes.shape.begin(), codes.shape.end() - 1);
    if (norms.shape != lead) {
      fail(kName, "input norms has shape " + shape_str(norms.shape) + ", expected " + shape_str(lead) +
                      " (the leading dimensions of codes " + shape_str(codes.shape) + ")");
    }
    std::vector<int64_t> out_shape = lead;
    out_shape.push_back(dim);
    auto x_hat = io.output(0, out_shape);
    const int64_t rows = product(lead, lead.size());
    if (rows == 0) return;
    tq::decode(codes.data<uint8_t>(), norms.data<float>(), rows, dim, rotation.data<float>(), codebook.data<float>(),
               static_cast<int>(bits_), x_hat.GetTensorMutableData<float>(), io.parallel());
  }

  ONNXTensorElementDataType float_type_;
  int64_t bits_;
};

}  // namespace

const OrtCustomOp* make_encode_op(ONNXTensorElementDataType float_type) { return new Op<EncodeKernel>(float_type); }

const OrtCustomOp* make_decode_op() { return new Op<DecodeKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT); }

}  // namespace tq_ort
