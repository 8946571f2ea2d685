// TQEncode (tq_deploy/ops.py: ENCODE): codes, norms = TQEncode(x[..., D], rotation[D, D], codebook[2**bits]).
#include "ort_op_base.h"

namespace tq_ort {

bool prepare(KernelIo& io, tq_encode_call& c) {
  namespace op = tq_ops::encode;
  const int bits = static_cast<int>(io.int_attr(op::kBits));
  Input x = io.input(op::kX), rotation = io.input(op::kRotation), codebook = io.input(op::kCodebook);
  if (x.shape.empty()) fail(io.op(), "input x is a scalar, expected shape [..., D]");
  check_rotation(io, rotation);
  io.dims().bind("D", x.shape.back(), "x", x.shape.size() - 1);
  check_codebook(io, codebook, bits, "bits");
  if (io.on_host()) check_codebook_values(io, codebook);
  std::vector<int64_t> lead(x.shape.begin(), x.shape.end() - 1), codes_shape = lead;
  codes_shape.push_back(tq::packed_size(io.dims().get("D"), bits));
  io.output(op::kCodes, codes_shape);
  io.output(op::kNorms, lead);
  op::fill(c, io);
  return c.rows > 0;
}

}  // namespace tq_ort
