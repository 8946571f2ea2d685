// TQDecode (tq_deploy/ops.py: DECODE): x_hat = TQDecode(codes[..., P], norms[...], rotation[D, D], codebook[2**bits]).
// No float type parameter: one kernel per provider (float_type is float32).
#include "ort_op_base.h"

namespace tq_ort {

bool prepare(KernelIo& io, tq_decode_call& c) {
  namespace op = tq_ops::decode;
  const int bits = static_cast<int>(io.int_attr(op::kBits));
  Input codes = io.input(op::kCodes), norms = io.input(op::kNorms);
  Input rotation = io.input(op::kRotation), codebook = io.input(op::kCodebook);
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
  std::vector<int64_t> shape(codes.shape.begin(), codes.shape.end() - 1);
  if (norms.shape != shape) {
    fail(io.op(), "input norms has shape " + shape_str(norms.shape) + ", expected " + shape_str(shape) +
                      " (the leading dimensions of codes " + shape_str(codes.shape) + ")");
  }
  if (io.on_host()) check_codebook_values(io, codebook);
  shape.push_back(dim);
  io.output(op::kXHat, shape);
  op::fill(c, io);
  return c.rows > 0;
}

}  // namespace tq_ort
