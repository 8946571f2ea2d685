// TQCacheUpdate (tq_deploy/ops.py: CACHE_UPDATE):
//   k_codes_out, k_norms_out, v_codes_out, v_norms_out = TQCacheUpdate(key, value, slot_mapping,
//       k_codes, k_norms, v_codes, v_norms, rotation, k_codebook, v_codebook)
// The outputs may reuse the cache inputs' buffers (ORT in-place through IO binding): then nothing is
// copied; otherwise each output starts as a copy of its input.
#include <cstring>

#include "ort_op_base.h"
#include "ort_paged_cache.h"
#include "tq_checks.h"

namespace tq_ort {
namespace {

namespace op = tq_ops::cache_update;

struct CacheUpdateShapes {
  int64_t num_tokens, num_slots;
  tq::PagedCache cache;
  std::vector<int64_t> cache_shapes[4];
};

CacheUpdateShapes check_cache_update(KernelIo& io, const CacheInputs& in, const Input& rotation,
                                     const Input& k_codebook, const Input& v_codebook, int k_bits, int v_bits) {
  check_rotation(io, rotation);
  check_codebook(io, k_codebook, k_bits, "k_bits");
  check_codebook(io, v_codebook, v_bits, "v_bits");
  check_cache(io, in, k_bits, v_bits);
  const DimTable& dims = io.dims();
  CacheUpdateShapes s{dims.get("T"), dims.get("N") * dims.get("B"), paged_cache(dims, k_bits, v_bits), {}};
  for (int i = 0; i < 4; ++i) s.cache_shapes[i] = in.at(i).shape;
  return s;
}

// Inputs in the contract's order; binding T, Hkv and D first (key), then the cache.
struct CacheUpdateInputs {
  Input key, value, slots;
  CacheInputs cache;
  Input rotation, k_codebook, v_codebook;
  explicit CacheUpdateInputs(KernelIo& io)
      : key(io.input(op::kKey, {"T", "Hkv", "D"})),
        value(io.input(op::kValue, {"T", "Hkv", "D"})),
        slots(io.input(op::kSlotMapping, {"T"})),
        cache(io, op::kKCodes),
        rotation(io.input(op::kRotation)),
        k_codebook(io.input(op::kKCodebook)),
        v_codebook(io.input(op::kVCodebook)) {}
};

struct CacheUpdateCpu : KernelBase<CacheUpdateCpu> {
  static constexpr const tq_ops::Op& kOp = op::kOp;
  static constexpr const char* kProvider = kCpuProvider;
  using KernelBase::KernelBase;

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_);
    const int k_bits = attrs_.bits(op::kKBits), v_bits = attrs_.bits(op::kVBits);
    CacheUpdateInputs in(io);
    CacheUpdateShapes s = check_cache_update(io, in.cache, in.rotation, in.k_codebook, in.v_codebook, k_bits, v_bits);
    check_codebook_values(io, in.k_codebook);
    check_codebook_values(io, in.v_codebook);
    const std::string problem = tq::check_slot_mapping(in.slots.data<int64_t>(), s.num_tokens, s.num_slots);
    if (!problem.empty()) fail(kOp.name, "input " + problem);
    void* out[4];
    for (int i = 0; i < 4; ++i) {
      auto value = io.output(i, s.cache_shapes[i]);
      out[i] = value.GetTensorMutableRawData();
      refuse_foreign_alias(io, i, out[i], in.cache, in.cache.first());
      const void* src = in.cache.at(i).raw();
      const size_t bytes = in.cache.at(i).value.GetTensorSizeInBytes();
      if (out[i] != src && bytes > 0) std::memcpy(out[i], src, bytes);
    }
    set_cache_pointers(s.cache, out);
    if (s.num_tokens == 0) return;
    tq::cache_update(in.key.raw(), in.value.raw(), to_dtype(float_type_), in.slots.data<int64_t>(), s.num_tokens,
                     s.cache, in.rotation.data<float>(), in.k_codebook.data<float>(), in.v_codebook.data<float>(),
                     io.parallel());
  }
};

#ifdef TQ_DEPLOY_ORT_CUDA
struct CacheUpdateCuda : KernelBase<CacheUpdateCuda> {
  static constexpr const tq_ops::Op& kOp = op::kOp;
  static constexpr const char* kProvider = kCudaProvider;
  using KernelBase::KernelBase;

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_);
    const int k_bits = attrs_.bits(op::kKBits), v_bits = attrs_.bits(op::kVBits);
    CacheUpdateInputs in(io);
    CacheUpdateShapes s = check_cache_update(io, in.cache, in.rotation, in.k_codebook, in.v_codebook, k_bits, v_bits);
    CudaLaunch launch(io, in.key);
    cudaStream_t stream = static_cast<cudaStream_t>(launch.stream());
    void* out[4];
    for (int i = 0; i < 4; ++i) {
      auto value = io.output(i, s.cache_shapes[i]);
      out[i] = value.GetTensorMutableRawData();
      refuse_foreign_alias(io, i, out[i], in.cache, in.cache.first());
      const void* src = in.cache.at(i).raw();
      const size_t bytes = in.cache.at(i).value.GetTensorSizeInBytes();
      if (out[i] != src && bytes > 0)
        launch.check(static_cast<int>(cudaMemcpyAsync(out[i], src, bytes, cudaMemcpyDeviceToDevice, stream)),
                     "copying the cache to its output");
    }
    set_cache_pointers(s.cache, out);
    if (s.num_tokens == 0) return;
    // Slots are device data: one outside [0, N*B) skips its token (tq_cuda.h), never raises.
    const size_t bytes = tq_cuda_cache_update_workspace(s.num_tokens);
    void* workspace = bytes ? launch.scratch(bytes) : nullptr;
    launch.check(tq_cuda_cache_update(in.key.raw(), in.value.raw(), to_cuda_dtype(float_type_),
                                      in.slots.data<int64_t>(), s.num_tokens, s.cache.num_kv_heads, s.cache.head_dim,
                                      s.cache.k_codes, s.cache.k_norms, s.cache.v_codes, s.cache.v_norms,
                                      s.cache.num_blocks, s.cache.block_size, in.rotation.data<float>(),
                                      in.k_codebook.data<float>(), in.v_codebook.data<float>(), k_bits, v_bits,
                                      workspace, bytes, stream),
                 "tq_cuda_cache_update");
  }
};
#endif

// TQCacheUpdate's outputs may reuse the cache inputs' buffers (in-place update).
size_t ORT_API_CALL cache_update_may_inplace(int** input_index, int** output_index) {
  *input_index = new int[4]{op::kKCodes, op::kKNorms, op::kVCodes, op::kVNorms};
  *output_index = new int[4]{op::kKCodesOut, op::kKNormsOut, op::kVCodesOut, op::kVNormsOut};
  return 4;
}

void ORT_API_CALL release_may_inplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

template <typename Kernel>
const OrtCustomOp* with_inplace(Op<Kernel>* custom_op) {
  custom_op->GetMayInplace = cache_update_may_inplace;
  custom_op->ReleaseMayInplace = release_may_inplace;
  return custom_op;
}

}  // namespace

const OrtCustomOp* make_cache_update_op(Provider provider, ONNXTensorElementDataType float_type) {
#ifdef TQ_DEPLOY_ORT_CUDA
  if (provider == Provider::kCuda) return with_inplace(new Op<CacheUpdateCuda>(float_type));
#endif
  return provider == Provider::kCpu ? with_inplace(new Op<CacheUpdateCpu>(float_type)) : nullptr;
}

}  // namespace tq_ort
