// TQEncode (tq_deploy/ops.py: ENCODE): codes, norms = TQEncode(x[..., D], rotation[D, D], codebook[2**bits]).
#include "ort_op_base.h"

#ifdef TQ_DEPLOY_ORT_CUDA
#include "tq_cuda.h"
#endif

namespace tq_ort {
namespace {

namespace op = tq_ops::encode;

struct EncodeShapes {
  int64_t rows, dim;
  std::vector<int64_t> lead;
};

// The checks both providers run: every input's type and shape against the contract.
EncodeShapes check_encode(KernelIo& io, const Input& x, const Input& rotation, const Input& codebook, int bits) {
  if (x.shape.empty()) fail(io.op(), "input x is a scalar, expected shape [..., D]");
  check_rotation(io, rotation);
  io.dims().bind("D", x.shape.back(), "x", x.shape.size() - 1);
  check_codebook(io, codebook, bits, "bits");
  EncodeShapes s{1, io.dims().get("D"), std::vector<int64_t>(x.shape.begin(), x.shape.end() - 1)};
  for (int64_t d : s.lead) s.rows *= d;
  return s;
}

std::vector<int64_t> codes_shape(const EncodeShapes& s, int bits) {
  std::vector<int64_t> shape = s.lead;
  shape.push_back(tq::packed_size(s.dim, bits));
  return shape;
}

struct EncodeCpu : KernelBase<EncodeCpu> {
  static constexpr const tq_ops::Op& kOp = op::kOp;
  static constexpr const char* kProvider = kCpuProvider;
  using KernelBase::KernelBase;

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_);
    const int bits = attrs_.bits(op::kBits);
    Input x = io.input(op::kX), rotation = io.input(op::kRotation), codebook = io.input(op::kCodebook);
    const EncodeShapes s = check_encode(io, x, rotation, codebook, bits);
    check_codebook_values(io, codebook);
    auto codes = io.output(op::kCodes, codes_shape(s, bits));
    auto norms = io.output(op::kNorms, s.lead);
    if (s.rows == 0) return;
    tq::encode(x.raw(), to_dtype(float_type_), s.rows, s.dim, rotation.data<float>(), codebook.data<float>(), bits,
               codes.GetTensorMutableData<uint8_t>(), norms.GetTensorMutableData<float>(), io.parallel());
  }
};

#ifdef TQ_DEPLOY_ORT_CUDA
struct EncodeCuda : KernelBase<EncodeCuda> {
  static constexpr const tq_ops::Op& kOp = op::kOp;
  static constexpr const char* kProvider = kCudaProvider;
  using KernelBase::KernelBase;

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_);
    const int bits = attrs_.bits(op::kBits);
    Input x = io.input(op::kX), rotation = io.input(op::kRotation), codebook = io.input(op::kCodebook);
    const EncodeShapes s = check_encode(io, x, rotation, codebook, bits);
    auto codes = io.output(op::kCodes, codes_shape(s, bits));
    auto norms = io.output(op::kNorms, s.lead);
    if (s.rows == 0) return;
    CudaLaunch launch(io, x);
    launch.check(tq_cuda_encode(x.raw(), to_cuda_dtype(float_type_), s.rows, s.dim, rotation.data<float>(),
                                codebook.data<float>(), bits, codes.GetTensorMutableData<uint8_t>(),
                                norms.GetTensorMutableData<float>(), static_cast<cudaStream_t>(launch.stream())),
                 "tq_cuda_encode");
  }
};
#endif

}  // namespace

const OrtCustomOp* make_encode_op(Provider provider, ONNXTensorElementDataType float_type) {
#ifdef TQ_DEPLOY_ORT_CUDA
  if (provider == Provider::kCuda) return new Op<EncodeCuda>(float_type);
#endif
  return provider == Provider::kCpu ? new Op<EncodeCpu>(float_type) : nullptr;
}

}  // namespace tq_ort
