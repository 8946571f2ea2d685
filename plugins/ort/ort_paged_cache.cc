#include "ort_paged_cache.h"

#include <cmath>

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

namespace att = tq_ops::paged_attention;
static_assert(att::kQuery == 0 && att::kKCodes == 1 && att::kBlockTables == 5 && att::kContextLens == 6 &&
                  tq_ops::paged_prefill::kQuery == 0 && tq_ops::paged_prefill::kKCodes == 1 &&
                  tq_ops::paged_prefill::kBlockTables == 5 && tq_ops::paged_prefill::kContextLens == 6,
              "PagedInputs reads the inputs both paged attention ops share at the same positions");

PagedInputs::PagedInputs(KernelIo& io, const char* rows)
    : query(io.input(att::kQuery, {rows, "Hq", "D"})),
      cache(io, att::kKCodes),
      block_tables(io.input(att::kBlockTables, {"S", "M"})),
      context_lens(io.input(att::kContextLens, {"S"})) {}

void check_paged_inputs(KernelIo& io, const PagedInputs& in, size_t rotation, int k_bits, int v_bits) {
  const Input pi = io.input(rotation), k_codebook = io.input(rotation + 1), v_codebook = io.input(rotation + 2);
  check_rotation(io, pi);
  check_codebook(io, k_codebook, k_bits, "k_bits");
  check_codebook(io, v_codebook, v_bits, "v_bits");
  check_cache(io, in.cache, k_bits, v_bits);
  const int64_t hq = io.dims().get("Hq"), hkv = io.dims().get("Hkv");
  if (hq < 1 || hq % hkv != 0) {
    std::ostringstream msg;
    msg << "input query has Hq=" << hq << " heads (query.shape[1]), expected a positive multiple of Hkv=" << hkv
        << " (k_codes.shape[2])";
    fail(io.op(), msg.str());
  }
  if (io.on_host()) {
    check_codebook_values(io, k_codebook);
    check_codebook_values(io, v_codebook);
  }
}

void fetch_key_mean(KernelIo& io, size_t key_mean) {
  const tq_ops::Tensor* spec = io.op_spec().inputs;
  const bool mean = io.has_input(key_mean), rates = io.has_input(key_mean + 1);
  if (!mean && !rates) return;
  if (mean != rates) {
    const char* given = spec[mean ? key_mean : key_mean + 1].name;
    const char* missing = spec[mean ? key_mean + 1 : key_mean].name;
    fail(io.op(), std::string("input ") + given + " is given without " + missing + ", expected both or neither");
  }
  const Input mu = io.input(key_mean, {"Hkv", "D"});
  const Input w = io.input(key_mean + 1, {"D/2"});
  const int64_t dim = io.dims().get("D");
  if (dim % 2 != 0 || io.dims().get("D/2") != dim / 2) {
    std::ostringstream msg;
    msg << "input rope_inv_freq has shape " << shape_str(w.shape) << ", expected [D/2] = [" << dim / 2
        << "] with D = " << dim << " even (" << io.dims().source("D") << ")";
    fail(io.op(), msg.str());
  }
  if (io.on_host()) {
    for (const Input* in : {&mu, &w}) {
      const float* v = in->data<float>();
      const size_t n = in->value.GetTensorTypeAndShapeInfo().GetElementCount();
      for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(v[i]))
          fail(io.op(), std::string("input ") + in->spec->name + " holds " + std::to_string(v[i]) + " at " +
                            std::to_string(i) + ", expected finite float32 values");
    }
  }
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
