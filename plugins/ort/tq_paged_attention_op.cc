// TQPagedAttention (tq_deploy/ops.py: PAGED_ATTENTION):
//   out = TQPagedAttention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
//                          rotation, k_codebook, v_codebook)
#include "ort_op_base.h"
#include "ort_paged_cache.h"
#include "tq_checks.h"

namespace tq_ort {
namespace {

namespace op = tq_ops::paged_attention;

struct AttentionInputs {
  Input query;
  CacheInputs cache;
  Input block_tables, context_lens, rotation, k_codebook, v_codebook;
  explicit AttentionInputs(KernelIo& io)
      : query(io.input(op::kQuery, {"S", "Hq", "D"})),
        cache(io, op::kKCodes),
        block_tables(io.input(op::kBlockTables, {"S", "M"})),
        context_lens(io.input(op::kContextLens, {"S"})),
        rotation(io.input(op::kRotation)),
        k_codebook(io.input(op::kKCodebook)),
        v_codebook(io.input(op::kVCodebook)) {}
};

struct AttentionShapes {
  int64_t num_seqs, num_q_heads, max_blocks;
  tq::PagedCache cache;
};

AttentionShapes check_paged_attention(KernelIo& io, const AttentionInputs& in, int k_bits, int v_bits) {
  check_rotation(io, in.rotation);
  check_codebook(io, in.k_codebook, k_bits, "k_bits");
  check_codebook(io, in.v_codebook, v_bits, "v_bits");
  check_cache(io, in.cache, k_bits, v_bits);
  const DimTable& dims = io.dims();
  const int64_t hq = dims.get("Hq"), hkv = dims.get("Hkv");
  if (hq < 1 || hq % hkv != 0) {
    std::ostringstream msg;
    msg << "input query has Hq=" << hq << " heads (query.shape[1]), expected a positive multiple of Hkv=" << hkv
        << " (k_codes.shape[2])";
    fail(io.op(), msg.str());
  }
  AttentionShapes s{dims.get("S"), hq, dims.get("M"), paged_cache(dims, k_bits, v_bits)};
  void* const buffers[4] = {const_cast<void*>(in.cache.k_codes.raw()), const_cast<void*>(in.cache.k_norms.raw()),
                            const_cast<void*>(in.cache.v_codes.raw()), const_cast<void*>(in.cache.v_norms.raw())};
  set_cache_pointers(s.cache, buffers);
  return s;
}

struct PagedAttentionCpu : KernelBase<PagedAttentionCpu> {
  static constexpr const tq_ops::Op& kOp = op::kOp;
  static constexpr const char* kProvider = kCpuProvider;
  using KernelBase::KernelBase;

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_);
    const int k_bits = attrs_.bits(op::kKBits), v_bits = attrs_.bits(op::kVBits);
    AttentionInputs in(io);
    const AttentionShapes s = check_paged_attention(io, in, k_bits, v_bits);
    check_codebook_values(io, in.k_codebook);
    check_codebook_values(io, in.v_codebook);
    const std::string problem =
        tq::check_block_tables(in.block_tables.data<int32_t>(), in.context_lens.data<int32_t>(), s.num_seqs,
                               s.max_blocks, s.cache.num_blocks, s.cache.block_size);
    if (!problem.empty()) fail(kOp.name, "input " + problem);
    auto out = io.output(op::kOut, in.query.shape);
    if (s.num_seqs == 0) return;
    tq::paged_attention(in.query.raw(), to_dtype(float_type_), s.num_seqs, s.num_q_heads, s.cache,
                        in.block_tables.data<int32_t>(), s.max_blocks, in.context_lens.data<int32_t>(),
                        in.rotation.data<float>(), in.k_codebook.data<float>(), in.v_codebook.data<float>(),
                        attrs_.real(op::kScale), out.GetTensorMutableRawData(), io.parallel());
  }
};

#ifdef TQ_DEPLOY_ORT_CUDA
struct PagedAttentionCuda : KernelBase<PagedAttentionCuda> {
  static constexpr const tq_ops::Op& kOp = op::kOp;
  static constexpr const char* kProvider = kCudaProvider;
  using KernelBase::KernelBase;

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_);
    const int k_bits = attrs_.bits(op::kKBits), v_bits = attrs_.bits(op::kVBits);
    AttentionInputs in(io);
    const AttentionShapes s = check_paged_attention(io, in, k_bits, v_bits);
    auto out = io.output(op::kOut, in.query.shape);
    if (s.num_seqs == 0) return;
    // Block tables and context lengths are device data: out-of-range entries are skipped and
    // lengths clamped by the kernel (tq_cuda.h), never read out of bounds.
    CudaLaunch launch(io, in.query);
    const tq::PagedCache& c = s.cache;
    const size_t bytes = tq_cuda_paged_attention_workspace(s.num_seqs, s.num_q_heads, c.num_kv_heads, c.head_dim,
                                                           s.max_blocks, c.block_size, k_bits, v_bits, 0);
    void* workspace = launch.scratch(bytes);
    launch.check(tq_cuda_paged_attention(in.query.raw(), to_cuda_dtype(float_type_), s.num_seqs, s.num_q_heads,
                                         c.num_kv_heads, c.head_dim, c.k_codes, c.k_norms, c.v_codes, c.v_norms,
                                         c.num_blocks, c.block_size, in.block_tables.data<int32_t>(), s.max_blocks,
                                         in.context_lens.data<int32_t>(), in.rotation.data<float>(),
                                         in.k_codebook.data<float>(), in.v_codebook.data<float>(), k_bits, v_bits,
                                         attrs_.real(op::kScale), 0, workspace, bytes, out.GetTensorMutableRawData(),
                                         static_cast<cudaStream_t>(launch.stream())),
                 "tq_cuda_paged_attention");
  }
};
#endif

}  // namespace

const OrtCustomOp* make_paged_attention_op(Provider provider, ONNXTensorElementDataType float_type) {
#ifdef TQ_DEPLOY_ORT_CUDA
  if (provider == Provider::kCuda) return new Op<PagedAttentionCuda>(float_type);
#endif
  return provider == Provider::kCpu ? new Op<PagedAttentionCpu>(float_type) : nullptr;
}

}  // namespace tq_ort
