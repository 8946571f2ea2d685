// TQPagedPrefill (tq_deploy/ops.py: PAGED_PREFILL):
//   out = TQPagedPrefill(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, query_start,
//                        rotation, k_codebook, v_codebook[, key_mean, rope_inv_freq])
#include "ort_op_base.h"
#include "ort_paged_cache.h"
#include "tq_checks.h"

namespace tq_ort {

bool prepare(KernelIo& io, tq_paged_prefill_call& c) {
  namespace op = tq_ops::paged_prefill;
  const int k_bits = static_cast<int>(io.int_attr(op::kKBits)), v_bits = static_cast<int>(io.int_attr(op::kVBits));
  const PagedInputs in(io, "T");
  const Input query_start = io.input(op::kQueryStart, {"S+1"});
  check_paged_inputs(io, in, op::kRotation, k_bits, v_bits);
  fetch_key_mean(io, op::kKeyMean);
  const DimTable& dims = io.dims();
  const int64_t s = dims.get("S");
  if (dims.get("S+1") != s + 1) {
    std::ostringstream msg;
    msg << "input query_start has shape " << shape_str(query_start.shape) << ", expected [S+1] = [" << s + 1
        << "] (S = " << dims.source("S") << ")";
    fail(io.op(), msg.str());
  }
  if (io.on_host()) {
    const int32_t* lens = in.context_lens.data<int32_t>();
    std::string problem = tq::check_block_tables(in.block_tables.data<int32_t>(), lens, s, dims.get("M"),
                                                 dims.get("N"), dims.get("B"));
    if (problem.empty()) problem = tq::check_query_start(query_start.data<int32_t>(), lens, s, dims.get("T"));
    if (!problem.empty()) fail(io.op(), "input " + problem);
  }
  // On CUDA the tables, lengths and query_start are device data: clamped by the kernel (tq_cuda.h).
  io.output(op::kOut, in.query.shape);
  op::fill(c, io);
  return c.num_tokens > 0;
}

}  // namespace tq_ort
