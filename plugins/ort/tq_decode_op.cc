// TQDecode (tq_deploy/ops.py: DECODE): x_hat = TQDecode(codes[..., P], norms[...], rotation[D, D], codebook[2**bits]).
#include "ort_op_base.h"

#ifdef TQ_DEPLOY_ORT_CUDA
#include "tq_cuda.h"
#endif

namespace tq_ort {
namespace {

namespace op = tq_ops::decode;

struct DecodeShapes {
  int64_t rows, dim;
  std::vector<int64_t> lead;
};

DecodeShapes check_decode(KernelIo& io, const Input& codes, const Input& norms, const Input& rotation,
                          const Input& codebook, int bits) {
  check_rotation(io, rotation);
  check_codebook(io, codebook, bits, "bits");
  const int64_t dim = io.dims().get("D");
  const int64_t packed = tq::packed_size(dim, bits);
  if (codes.shape.empty() || codes.shape.back() != packed) {
    std::ostringstream msg;
    msg << "input codes has shape " << shape_str(codes.shape) << ", expected [..., " << packed
        << "] (P = ceil(D * bits / 8) with D=" << dim << " from rotation, bits=" << bits << ")";
    fail(io.op(), msg.str());
  }
  DecodeShapes s{1, dim, std::vector<int64_t>(codes.shape.begin(), codes.shape.end() - 1)};
  if (norms.shape != s.lead) {
    fail(io.op(), "input norms has shape " + shape_str(norms.shape) + ", expected " + shape_str(s.lead) +
                      " (the leading dimensions of codes " + shape_str(codes.shape) + ")");
  }
  for (int64_t d : s.lead) s.rows *= d;
  return s;
}

std::vector<int64_t> out_shape(const DecodeShapes& s) {
  std::vector<int64_t> shape = s.lead;
  shape.push_back(s.dim);
  return shape;
}

struct DecodeCpu : KernelBase<DecodeCpu> {
  static constexpr const tq_ops::Op& kOp = op::kOp;
  static constexpr const char* kProvider = kCpuProvider;
  using KernelBase::KernelBase;

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_);
    const int bits = attrs_.bits(op::kBits);
    Input codes = io.input(op::kCodes), norms = io.input(op::kNorms);
    Input rotation = io.input(op::kRotation), codebook = io.input(op::kCodebook);
    const DecodeShapes s = check_decode(io, codes, norms, rotation, codebook, bits);
    check_codebook_values(io, codebook);
    auto x_hat = io.output(op::kXHat, out_shape(s));
    if (s.rows == 0) return;
    tq::decode(codes.data<uint8_t>(), norms.data<float>(), s.rows, s.dim, rotation.data<float>(),
               codebook.data<float>(), bits, x_hat.GetTensorMutableData<float>(), io.parallel());
  }
};

#ifdef TQ_DEPLOY_ORT_CUDA
struct DecodeCuda : KernelBase<DecodeCuda> {
  static constexpr const tq_ops::Op& kOp = op::kOp;
  static constexpr const char* kProvider = kCudaProvider;
  using KernelBase::KernelBase;

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_);
    const int bits = attrs_.bits(op::kBits);
    Input codes = io.input(op::kCodes), norms = io.input(op::kNorms);
    Input rotation = io.input(op::kRotation), codebook = io.input(op::kCodebook);
    const DecodeShapes s = check_decode(io, codes, norms, rotation, codebook, bits);
    auto x_hat = io.output(op::kXHat, out_shape(s));
    if (s.rows == 0) return;
    CudaLaunch launch(io, codes);
    launch.check(tq_cuda_decode(codes.data<uint8_t>(), norms.data<float>(), s.rows, s.dim, rotation.data<float>(),
                                codebook.data<float>(), bits, x_hat.GetTensorMutableData<float>(),
                                static_cast<cudaStream_t>(launch.stream())),
                 "tq_cuda_decode");
  }
};
#endif

}  // namespace

// TQDecode has no float type parameter: one kernel per provider (float_type is float32).
const OrtCustomOp* make_decode_op(Provider provider, ONNXTensorElementDataType float_type) {
#ifdef TQ_DEPLOY_ORT_CUDA
  if (provider == Provider::kCuda) return new Op<DecodeCuda>(float_type);
#endif
  return provider == Provider::kCpu ? new Op<DecodeCpu>(float_type) : nullptr;
}

}  // namespace tq_ort
