// TQCacheUpdate and TQPagedAttention (tq_deploy/ops.py: CACHE_UPDATE, PAGED_ATTENTION).
#include <cstring>

#include "ort_op_base.h"
#include "tq_checks.h"

namespace tq_ort {
namespace {

// The paged cache as inputs (k_codes, ...) or as TQCacheUpdate's outputs (k_codes_out, ...).
std::vector<IoSpec> cache_specs(bool as_outputs = false) {
  const auto u8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  const auto f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (as_outputs) return {{"k_codes_out", u8}, {"k_norms_out", f32}, {"v_codes_out", u8}, {"v_norms_out", f32}};
  return {{"k_codes", u8}, {"k_norms", f32}, {"v_codes", u8}, {"v_norms", f32}};
}

struct CacheInputs {
  Input k_codes, k_norms, v_codes, v_norms;
};

// Fetches the four paged-cache inputs starting at `first` and checks them against each other
// and against D (already bound) and the bit widths.
CacheInputs cache_inputs(KernelIo& io, size_t first, int64_t k_bits, int64_t v_bits) {
  CacheInputs c{io.input(first, {"N", "B", "Hkv", "Pk"}), io.input(first + 1, {"N", "B", "Hkv"}),
                io.input(first + 2, {"N", "B", "Hkv", "Pv"}), io.input(first + 3, {"N", "B", "Hkv"})};
  DimTable& dims = io.dims();
  const int64_t d = dims.get("D");
  const struct {
    const char* symbol;
    const char* input;
    const char* bits_name;
    int64_t bits;
  } packed[] = {{"Pk", "k_codes", "k_bits", k_bits}, {"Pv", "v_codes", "v_bits", v_bits}};
  for (const auto& p : packed) {
    const int64_t expected = tq::packed_size(d, static_cast<int>(p.bits));
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
  return c;
}

tq::PagedCache paged_cache(const DimTable& dims, int64_t k_bits, int64_t v_bits) {
  tq::PagedCache cache{};
  cache.num_blocks = dims.get("N");
  cache.block_size = dims.get("B");
  cache.num_kv_heads = dims.get("Hkv");
  cache.head_dim = dims.get("D");
  cache.k_bits = static_cast<int>(k_bits);
  cache.v_bits = static_cast<int>(v_bits);
  return cache;
}

// k_codes_out, k_norms_out, v_codes_out, v_norms_out = TQCacheUpdate(key, value, slot_mapping,
//     k_codes, k_norms, v_codes, v_norms, rotation, k_codebook, v_codebook)
struct CacheUpdateKernel : KernelBase<CacheUpdateKernel> {
  static constexpr const char* kName = "TQCacheUpdate";
  static const std::vector<IoSpec>& inputs() {
    static const std::vector<IoSpec> v = [] {
      std::vector<IoSpec> s{{"key", kTypeT}, {"value", kTypeT}, {"slot_mapping", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64}};
      for (const auto& c : cache_specs()) s.push_back(c);
      s.push_back({"rotation", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT});
      s.push_back({"k_codebook", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT});
      s.push_back({"v_codebook", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT});
      return s;
    }();
    return v;
  }
  static const std::vector<IoSpec>& outputs() {
    static const std::vector<IoSpec> v = cache_specs(/*as_outputs=*/true);
    return v;
  }

  CacheUpdateKernel(const OrtKernelInfo* info, ONNXTensorElementDataType float_type)
      : float_type_(float_type),
        k_bits_(checked_bits(info, kName, "k_bits")),
        v_bits_(checked_bits(info, kName, "v_bits")) {}

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kName, inputs(), float_type_);
    Input key = io.input(0, {"T", "Hkv", "D"});
    Input value = io.input(1, {"T", "Hkv", "D"});
    Input slots = io.input(2, {"T"});
    CacheInputs in = cache_inputs(io, 3, k_bits_, v_bits_);
    Input rotation = io.input(7);
    check_rotation(io, rotation);
    Input k_codebook = io.input(8);
    Input v_codebook = io.input(9);
    check_codebook(io, k_codebook, k_bits_, "k_bits");
    check_codebook(io, v_codebook, v_bits_, "v_bits");

    const DimTable& dims = io.dims();
    const int64_t num_tokens = dims.get("T");
    const int64_t num_slots = dims.get("N") * dims.get("B");
    const std::string problem = tq::check_slot_mapping(slots.data<int64_t>(), num_tokens, num_slots);
    if (!problem.empty()) fail(kName, "input " + problem);

    // Outputs start as the input caches (ORT may hand us the input buffers themselves).
    const Input* cache_in[] = {&in.k_codes, &in.k_norms, &in.v_codes, &in.v_norms};
    void* out_ptr[4];
    for (size_t i = 0; i < 4; ++i) {
      auto out = io.output(i, cache_in[i]->shape);
      out_ptr[i] = out.GetTensorMutableRawData();
      const void* src = cache_in[i]->value.GetTensorRawData();
      const size_t bytes = cache_in[i]->value.GetTensorSizeInBytes();
      if (out_ptr[i] != src && bytes > 0) std::memcpy(out_ptr[i], src, bytes);
    }
    tq::PagedCache cache = paged_cache(dims, k_bits_, v_bits_);
    cache.k_codes = static_cast<uint8_t*>(out_ptr[0]);
    cache.k_norms = static_cast<float*>(out_ptr[1]);
    cache.v_codes = static_cast<uint8_t*>(out_ptr[2]);
    cache.v_norms = static_cast<float*>(out_ptr[3]);
    if (num_tokens == 0) return;
    tq::cache_update(key.value.GetTensorRawData(), value.value.GetTensorRawData(), to_dtype(float_type_),
                     slots.data<int64_t>(), num_tokens, cache, rotation.data<float>(), k_codebook.data<float>(),
                     v_codebook.data<float>(), io.parallel());
  }

  ONNXTensorElementDataType float_type_;
  int64_t k_bits_, v_bits_;
};

// out = TQPagedAttention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
//     rotation, k_codebook, v_codebook)
struct PagedAttentionKernel : KernelBase<PagedAttentionKernel> {
  static constexpr const char* kName = "TQPagedAttention";
  static const std::vector<IoSpec>& inputs() {
    static const std::vector<IoSpec> v = [] {
      std::vector<IoSpec> s{{"query", kTypeT}};
      for (const auto& c : cache_specs()) s.push_back(c);
      s.push_back({"block_tables", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32});
      s.push_back({"context_lens", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32});
      s.push_back({"rotation", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT});
      s.push_back({"k_codebook", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT});
      s.push_back({"v_codebook", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT});
      return s;
    }();
    return v;
  }
  static const std::vector<IoSpec>& outputs() {
    static const std::vector<IoSpec> v{{"out", kTypeT}};
    return v;
  }

  PagedAttentionKernel(const OrtKernelInfo* info, ONNXTensorElementDataType float_type)
      : float_type_(float_type),
        k_bits_(checked_bits(info, kName, "k_bits")),
        v_bits_(checked_bits(info, kName, "v_bits")),
        scale_(float_attribute(info, "scale", 0.f)) {
    if (!(scale_ >= 0.f)) {
      fail(kName, "attribute scale=" + std::to_string(scale_) + ", expected >= 0 (0 means 1/sqrt(D))");
    }
  }

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kName, inputs(), float_type_);
    Input query = io.input(0, {"S", "Hq", "D"});
    CacheInputs in = cache_inputs(io, 1, k_bits_, v_bits_);
    Input block_tables = io.input(5, {"S", "M"});
    Input context_lens = io.input(6, {"S"});
    Input rotation = io.input(7);
    check_rotation(io, rotation);
    Input k_codebook = io.input(8);
    Input v_codebook = io.input(9);
    check_codebook(io, k_codebook, k_bits_, "k_bits");
    check_codebook(io, v_codebook, v_bits_, "v_bits");

    const DimTable& dims = io.dims();
    const int64_t hq = dims.get("Hq"), hkv = dims.get("Hkv");
    if (hq % hkv != 0) {
      std::ostringstream msg;
      msg << "input query has Hq=" << hq << " heads (query.shape[1]), expected a multiple of Hkv=" << hkv
          << " (k_codes.shape[2])";
      fail(kName, msg.str());
    }
    const int64_t num_seqs = dims.get("S"), max_blocks = dims.get("M");
    const std::string problem =
        tq::check_block_tables(block_tables.data<int32_t>(), context_lens.data<int32_t>(), num_seqs, max_blocks,
                               dims.get("N"), dims.get("B"));
    if (!problem.empty()) fail(kName, "input " + problem);

    auto out = io.output(0, query.shape);
    if (num_seqs == 0 || hq == 0) return;
    tq::PagedCache cache = paged_cache(dims, k_bits_, v_bits_);
    cache.k_codes = const_cast<uint8_t*>(in.k_codes.data<uint8_t>());
    cache.k_norms = const_cast<float*>(in.k_norms.data<float>());
    cache.v_codes = const_cast<uint8_t*>(in.v_codes.data<uint8_t>());
    cache.v_norms = const_cast<float*>(in.v_norms.data<float>());
    tq::paged_attention(query.value.GetTensorRawData(), to_dtype(float_type_), num_seqs, hq, cache,
                        block_tables.data<int32_t>(), max_blocks, context_lens.data<int32_t>(),
                        rotation.data<float>(), k_codebook.data<float>(), v_codebook.data<float>(), scale_,
                        out.GetTensorMutableRawData(), io.parallel());
  }

  ONNXTensorElementDataType float_type_;
  int64_t k_bits_, v_bits_;
  float scale_;
};

// TQCacheUpdate's outputs may reuse the cache inputs' buffers (in-place update).
size_t ORT_API_CALL cache_update_may_inplace(int** input_index, int** output_index) {
  *input_index = new int[4]{3, 4, 5, 6};
  *output_index = new int[4]{0, 1, 2, 3};
  return 4;
}

void ORT_API_CALL release_may_inplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

}  // namespace

const OrtCustomOp* make_cache_update_op(ONNXTensorElementDataType float_type) {
  auto* op = new Op<CacheUpdateKernel>(float_type);
  op->GetMayInplace = cache_update_may_inplace;
  op->ReleaseMayInplace = release_may_inplace;
  return op;
}

const OrtCustomOp* make_paged_attention_op(ONNXTensorElementDataType float_type) {
  return new Op<PagedAttentionKernel>(float_type);
}

}  // namespace tq_ort
