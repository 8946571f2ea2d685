// TQPagedAttention (tq_deploy/ops.py: PAGED_ATTENTION):
//   out = TQPagedAttention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
//                          rotation, k_codebook, v_codebook[, key_mean, rope_inv_freq])
#include "ort_op_base.h"
#include "ort_paged_cache.h"
#include "tq_checks.h"

namespace tq_ort {

bool prepare(KernelIo& io, tq_paged_attention_call& c) {
  namespace op = tq_ops::paged_attention;
  const int k_bits = static_cast<int>(io.int_attr(op::kKBits)), v_bits = static_cast<int>(io.int_attr(op::kVBits));
  const PagedInputs in(io, "S");
  check_paged_inputs(io, in, op::kRotation, k_bits, v_bits);
  fetch_key_mean(io, op::kKeyMean);
  const DimTable& dims = io.dims();
  if (io.on_host()) {
    const std::string problem =
        tq::check_block_tables(in.block_tables.data<int32_t>(), in.context_lens.data<int32_t>(), dims.get("S"),
                               dims.get("M"), dims.get("N"), dims.get("B"));
    if (!problem.empty()) fail(io.op(), "input " + problem);
  }
  // On CUDA block tables and context lengths are device data: out-of-range entries are skipped
  // and lengths clamped by the kernel (tq_cuda.h), never read out of bounds.
  io.output(op::kOut, in.query.shape);
  op::fill(c, io);
  return c.num_seqs > 0;
}

}  // namespace tq_ort
