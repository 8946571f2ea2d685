// tq_cuda_paged_prefill: query row j of sequence s (position p = context_lens[s] - n_s + j) is a
// decode query of that sequence whose context ends at p. One small kernel writes each row's block
// table row and context length p + 1 into the workspace; the decode attention
// (tq_paged_attention.cu) then runs the T rows as T sequences.
//
// query_start is device data the host does not see: entries are clamped to [0, T], so a bad one
// never reads or writes out of bounds; rows no sequence claims keep context length 0 (zeros out).
#include <algorithm>

#include "tq_cuda_common.cuh"

namespace tq_cuda {
namespace {

__global__ void expand_rows_kernel(const int32_t* block_tables, const int32_t* context_lens,
                                   const int32_t* query_start, int64_t num_tokens, int64_t max_blocks,
                                   int32_t* row_tables, int32_t* row_lens) {
  const int64_t s = blockIdx.x;
  const int64_t first = min(max(int64_t{query_start[s]}, int64_t{0}), num_tokens);
  const int64_t last = min(max(int64_t{query_start[s + 1]}, first), num_tokens);
  const int64_t n = last - first;
  for (int64_t r = first; r < last; ++r) {
    for (int64_t e = threadIdx.x; e < max_blocks; e += blockDim.x)
      row_tables[r * max_blocks + e] = block_tables[s * max_blocks + e];
    if (threadIdx.x == 0)
      row_lens[r] = static_cast<int32_t>(max(int64_t{context_lens[s]} - n + (r - first) + 1, int64_t{0}));
  }
}

// The decode attention's call over the prefill's rows: the prefill's tensors and sizes with one
// "sequence" per row (block_tables and context_lens: the expanded ones in the workspace).
tq_paged_attention_call rows_call(const tq_paged_prefill_call& c) {
  tq_paged_attention_call a{};
  a.query = c.query;
  a.k_codes = c.k_codes;
  a.k_norms = c.k_norms;
  a.v_codes = c.v_codes;
  a.v_norms = c.v_norms;
  a.rotation = c.rotation;
  a.k_codebook = c.k_codebook;
  a.v_codebook = c.v_codebook;
  a.key_mean = c.key_mean;  // a row's positions are its sequence's: the key mean's term holds as is
  a.rope_inv_freq = c.rope_inv_freq;
  a.out = c.out;
  a.num_seqs = c.num_tokens;
  a.num_q_heads = c.num_q_heads;
  a.head_dim = c.head_dim;
  a.num_blocks = c.num_blocks;
  a.block_size = c.block_size;
  a.num_kv_heads = c.num_kv_heads;
  a.max_blocks = c.max_blocks;
  a.k_bits = c.k_bits;
  a.v_bits = c.v_bits;
  a.scale = c.scale;
  a.dtype = c.dtype;
  a.norm_dtype = c.norm_dtype;
  a.stream = c.stream;
  return a;
}

struct Layout {
  size_t tables, lens, attention;  // offsets into the workspace
  size_t bytes;
};

Layout layout(const tq_paged_prefill_call& c, size_t attention_bytes) {
  Layout l{};
  l.tables = 0;
  l.lens = align256(static_cast<size_t>(c.num_tokens * c.max_blocks) * sizeof(int32_t));
  l.attention = l.lens + align256(static_cast<size_t>(c.num_tokens) * sizeof(int32_t));
  l.bytes = l.attention + attention_bytes;
  return l;
}

}  // namespace
}  // namespace tq_cuda

using namespace tq_cuda;

extern "C" size_t tq_cuda_paged_prefill_workspace(const tq_paged_prefill_call* c) {
  if (c == nullptr || c->num_tokens <= 0 || c->num_seqs < 0 || c->max_blocks < 0) return 0;
  const tq_paged_attention_call a = rows_call(*c);
  return layout(*c, tq_cuda_paged_attention_workspace(&a)).bytes;
}

extern "C" int tq_cuda_paged_prefill(const tq_paged_prefill_call* c) {
  if (c == nullptr || c->num_seqs < 0 || c->num_seqs > (int64_t{1} << 24) || c->num_tokens < 0 || c->max_blocks < 0)
    return TQ_CUDA_BAD_ARGUMENT;
  tq_paged_attention_call a = rows_call(*c);
  tq_cuda_paged_attention_plan_t plan;
  if (int rc = tq_cuda_paged_attention_plan(&a, 0, &plan)) return rc;
  if (c->num_tokens == 0) return 0;
  const Layout l = layout(*c, plan.workspace_bytes);
  if (c->workspace == nullptr || c->workspace_bytes < l.bytes) return TQ_CUDA_BAD_ARGUMENT;
  char* ws = static_cast<char*>(c->workspace);
  int32_t* tables = reinterpret_cast<int32_t*>(ws + l.tables);
  int32_t* lens = reinterpret_cast<int32_t*>(ws + l.lens);
  cudaStream_t stream = static_cast<cudaStream_t>(c->stream);
  if (cudaError_t rc = cudaMemsetAsync(lens, 0, c->num_tokens * sizeof(int32_t), stream)) return static_cast<int>(rc);
  if (c->num_seqs > 0) {
    expand_rows_kernel<<<static_cast<unsigned>(c->num_seqs), 128, 0, stream>>>(
        c->block_tables, c->context_lens, c->query_start, c->num_tokens, c->max_blocks, tables, lens);
    if (int rc = launch_status()) return rc;
  }
  a.block_tables = tables;
  a.context_lens = lens;
  a.workspace = ws + l.attention;
  a.workspace_bytes = plan.workspace_bytes;
  return tq_cuda_paged_attention_run(&plan, &a);
}
