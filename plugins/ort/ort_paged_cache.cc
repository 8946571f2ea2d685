#include "ort_paged_cache.h"

namespace tq_ort {

void check_cache(KernelIo& io, const CacheInputs& cache, int k_bits, int v_bits) {
  (void)cache;
  DimTable& dims = io.dims();
  const int64_t d = dims.get("D");
  const struct {
    const char* symbol;
    const char* input;
    const char* bits_name;
    int bits;
  } packed[] = {{"Pk", "k_codes", "k_bits", k_bits}, {"Pv", "v_codes", "v_bits", v_bits}};
  for (const auto& p : packed) {
    const int64_t expected = tq::packed_size(d, p.bits);
    if (dims.get(p.symbol) != expected) {
      std::ostringstream msg;
      msg << "input " << p.input << " has " << p.input << ".shape[3]=" << dims.get(p.symbol) << ", expected "
          << p.symbol << " = ceil(D * " << p.bits_name << " / 8) = " << expected << " (D=" << d << " from "
          << dims.source("D") << ", " << p.bits_name << "=" << p.bits << ")";
      fail(io.op(), msg.str());
    }
  }
  if (dims.get("B") < 1) fail(io.op(), "input k_codes has block size B=0 (k_codes.shape[1]), expected B >= 1");
  if (dims.get("Hkv") < 1) fail(io.op(), "input k_codes has Hkv=0 KV heads (k_codes.shape[2]), expected Hkv >= 1");
}

tq::PagedCache paged_cache(const DimTable& dims, int k_bits, int v_bits) {
  tq::PagedCache cache{};
  cache.num_blocks = dims.get("N");
  cache.block_size = dims.get("B");
  cache.num_kv_heads = dims.get("Hkv");
  cache.head_dim = dims.get("D");
  cache.k_bits = k_bits;
  cache.v_bits = v_bits;
  return cache;
}

void set_cache_pointers(tq::PagedCache& cache, void* const (&buffers)[4]) {
  cache.k_codes = static_cast<uint8_t*>(buffers[0]);
  cache.k_norms = static_cast<float*>(buffers[1]);
  cache.v_codes = static_cast<uint8_t*>(buffers[2]);
  cache.v_norms = static_cast<float*>(buffers[3]);
}

void refuse_foreign_alias(KernelIo& io, int index, const void* output, const CacheInputs& cache,
                          size_t first_cache_input) {
  const Input& own = cache.at(index);
  const size_t bytes = own.value.GetTensorSizeInBytes();
  if (bytes == 0) return;
  const char* out_begin = static_cast<const char*>(output);
  const char* out_end = out_begin + bytes;
  const size_t count = io.context().GetInputCount();
  for (size_t i = 0; i < count; ++i) {
    if (i == first_cache_input + static_cast<size_t>(index)) continue;
    Ort::ConstValue value = io.context().GetInput(i);
    if (value == nullptr) continue;
    const char* begin = static_cast<const char*>(value.GetTensorRawData());
    const char* end = begin + value.GetTensorSizeInBytes();
    if (begin < out_end && out_begin < end) {
      std::ostringstream msg;
      msg << "output " << io.op_spec().outputs[index].name << " shares memory with input "
          << io.op_spec().inputs[i].name << ", expected it to be its own input " << own.spec->name
          << "'s buffer (in place) or separate memory";
      fail(io.op(), msg.str());
    }
  }
}

}  // namespace tq_ort
