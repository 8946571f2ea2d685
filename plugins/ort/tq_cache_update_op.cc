// TQCacheUpdate (tq_deploy/ops.py: CACHE_UPDATE):
//   k_codes_out, k_norms_out, v_codes_out, v_norms_out = TQCacheUpdate(key, value, slot_mapping,
//       k_codes, k_norms, v_codes, v_norms, rotation, k_codebook, v_codebook)
// The outputs may reuse the cache inputs' buffers (ORT in-place through IO binding, declared from
// the contract's in-place pairs): then nothing is copied; otherwise each output starts as a copy of
// its input.
#include "ort_op_base.h"
#include "ort_paged_cache.h"
#include "tq_checks.h"

namespace tq_ort {

bool prepare(KernelIo& io, tq_cache_update_call& c) {
  namespace op = tq_ops::cache_update;
  const int k_bits = static_cast<int>(io.int_attr(op::kKBits)), v_bits = static_cast<int>(io.int_attr(op::kVBits));
  // in the contract's order: T, Hkv and D bound by key first, then the cache
  io.input(op::kKey, {"T", "Hkv", "D"});
  io.input(op::kValue, {"T", "Hkv", "D"});
  Input slots = io.input(op::kSlotMapping, {"T"});
  CacheInputs cache(io, op::kKCodes);
  Input rotation = io.input(op::kRotation), k_codebook = io.input(op::kKCodebook);
  Input v_codebook = io.input(op::kVCodebook);
  check_rotation(io, rotation);
  check_codebook(io, k_codebook, k_bits, "k_bits");
  check_codebook(io, v_codebook, v_bits, "v_bits");
  check_cache(io, cache, k_bits, v_bits);
  if (io.on_host()) {
    check_codebook_values(io, k_codebook);
    check_codebook_values(io, v_codebook);
    const DimTable& dims = io.dims();
    const std::string problem =
        tq::check_slot_mapping(slots.data<int64_t>(), dims.get("T"), dims.get("N") * dims.get("B"));
    if (!problem.empty()) fail(io.op(), "input " + problem);
  }
  // Slots are device data on CUDA: one outside [0, N*B) skips its token (tq_cuda.h), never raises.
  for (int i = 0; i < 4; ++i) {
    void* out = io.output(i, cache.at(i).shape).GetTensorMutableRawData();
    refuse_foreign_alias(io, i, out, cache, cache.first());
    io.copy(out, cache.at(i).raw(), cache.at(i).value.GetTensorSizeInBytes());
  }
  op::fill(c, io);
  return c.num_tokens > 0;
}

}  // namespace tq_ort
