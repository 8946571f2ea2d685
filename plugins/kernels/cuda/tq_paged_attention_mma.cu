// The tensor-core decode attention's host side: which shapes it takes, its split plan, its launch.
// The kernel is tq_paged_attention_mma.cuh; its instances are compiled per head dim in
// tq_paged_attention_mma_d{64,128,256}.cu, those with the key mean in tq_paged_attention_mma_d*_mean.cu.
#include <math.h>

#include <algorithm>

#include "tq_paged_attention_mma.cuh"

namespace tq_cuda {
namespace mma {

namespace {
bool packed_layout(int64_t dim) { return dim == 64 || dim == 128 || dim == 256; }
int64_t row_bytes(int64_t dim, int bits) { return (dim * bits + 7) / 8; }
// 4-byte words the raw path copies per row: a row of whole words starts on one (the codes' base
// is 4-byte aligned); any other may start up to 3 bytes into its first word
int64_t raw_words(int64_t dim, int bits) {
  const int64_t bytes = row_bytes(dim, bits);
  return bytes % 4 == 0 ? bytes / 4 : (bytes + 6) / 4;
}
}  // namespace

int64_t kernel_dim(int64_t dim, int k_bits, int v_bits) {
  if (packed_layout(dim)) return dim;
  if (dim < 2 || !valid_bits(k_bits) || !valid_bits(v_bits)) return 0;
  const int64_t bytes = 4 * std::max(raw_words(dim, k_bits), raw_words(dim, v_bits));
  for (int64_t padded = 32; padded <= 256; padded += 16)
    if (padded >= dim && padded >= bytes) return padded;
  return 0;
}

bool takes_key_mean(int64_t dim) { return packed_layout(dim); }

bool supported(int64_t hq, int64_t hkv, int64_t dim, int64_t block_size, int k_bits, int v_bits) {
  return hkv >= 1 && hq >= hkv && hq % hkv == 0 && block_size >= 1 && valid_bits(k_bits) && valid_bits(v_bits) &&
         kernel_dim(dim, k_bits, v_bits) > 0;
}

int chunk_alignment(int64_t dim, int k_bits, int v_bits) {
  if (!packed_layout(dim)) return 4;  // the raw path copies whole words
  const int k = min_int(16, lowest_bit(static_cast<int>(dim * k_bits / 8)));
  const int v = min_int(16, lowest_bit(static_cast<int>(dim * v_bits / 8)));
  return k > v ? k : v;
}

Plan make_plan(int64_t num_seqs, int64_t hkv, int64_t group, int64_t dim, int64_t max_blocks, int64_t block_size,
               int64_t tokens_per_split, int sms) {
  const int64_t chunk_heads = std::min<int64_t>(group, kMaxGroup);
  const int64_t units = num_seqs * hkv * ((group + kMaxGroup - 1) / kMaxGroup);
  const int warps = dim <= 128 ? 16 : 8;
  const int64_t tiles = std::max<int64_t>(1, (max_blocks * block_size + kTile - 1) / kTile);
  Plan p{};
  int64_t per_warp;
  if (tokens_per_split > 0) {
    per_warp = (tokens_per_split + kTile - 1) / kTile;
  } else {
    // one wave of one CTA per SM: a second wave of shorter CTAs pays the prologue (tables,
    // query rotation) and the merge tail twice (docs/performance.md, split sweep)
    const int64_t ctas = std::max<int64_t>(1, static_cast<int64_t>(sms) / std::max<int64_t>(units, 1));
    per_warp = (tiles + ctas * warps - 1) / (ctas * warps);
  }
  per_warp = std::max<int64_t>(per_warp, 1);
  p.tiles_per_warp = static_cast<int>(per_warp);
  p.ctas_per_pair = static_cast<int>((tiles + per_warp * warps - 1) / (per_warp * warps));
  p.tensor_cores = 1;
  if (p.ctas_per_pair > 1) {
    const size_t parts = static_cast<size_t>(units) * p.ctas_per_pair * chunk_heads;
    p.counters_offset = 0;
    p.ml_offset = align256(static_cast<size_t>(units) * sizeof(int));
    p.acc_offset = p.ml_offset + align256(parts * 2 * sizeof(float));
    p.workspace_bytes = p.acc_offset + align256(parts * dim * sizeof(float));
  }
  return p;
}

int run(const AttentionCall& c, const Plan& plan) {
  const int64_t hkv = c.num_kv_heads, dim = c.head_dim;
  const int k_bits = c.k_bits, v_bits = c.v_bits;
  cudaStream_t stream = static_cast<cudaStream_t>(c.stream);
  SplitArgs args{};
  args.query = c.query;
  args.q_type = static_cast<tq_cuda_dtype>(c.dtype);
  args.cache = cache_args(c);
  args.half_norms = half_norms(c);
  args.rotation = c.rotation;
  args.k_codebook = c.k_codebook;
  args.v_codebook = c.v_codebook;
  args.q_scale = plan.scale * kLog2e;
  set_sizes(args, c);
  args.dim = static_cast<int>(dim);
  args.k_bits = k_bits;
  args.v_bits = v_bits;
  args.k_row = static_cast<int>(row_bytes(dim, k_bits));
  args.v_row = static_cast<int>(row_bytes(dim, v_bits));
  args.k_words = static_cast<int>(raw_words(dim, k_bits));
  args.v_words = static_cast<int>(raw_words(dim, v_bits));
  args.per_k_words = FastDiv::of(static_cast<uint32_t>(args.k_words));
  args.per_v_words = FastDiv::of(static_cast<uint32_t>(args.v_words));
  args.chunks = static_cast<int>((args.group + kMaxGroup - 1) / kMaxGroup);
  args.chunk_heads = std::min(args.group, kMaxGroup);
  args.per_block = FastDiv::of(static_cast<uint32_t>(c.block_size));
  args.tiles_per_warp = plan.tiles_per_warp;
  args.ctas_per_pair = plan.ctas_per_pair;
  args.out = c.out;
  const unsigned units = static_cast<unsigned>(c.num_seqs * hkv * args.chunks);
  if (plan.ctas_per_pair > 1) {
    char* ws = static_cast<char*>(c.workspace);
    args.counters = reinterpret_cast<int*>(ws + plan.counters_offset);
    args.part_ml = reinterpret_cast<float*>(ws + plan.ml_offset);
    args.part_acc = reinterpret_cast<float*>(ws + plan.acc_offset);
    if (cudaError_t rc = cudaMemsetAsync(args.counters, 0, units * sizeof(int), stream)) return static_cast<int>(rc);
  }
  if (c.key_mean != nullptr) {  // the dispatcher sends the key mean here with a packed head dim only
    args.key_mean = c.key_mean;
    args.rope_inv_freq = c.rope_inv_freq;
    switch (dim) {
      case 64: return launch_bits<64, true>(args, plan, units, k_bits, v_bits, stream);
      case 128: return launch_bits<128, true>(args, plan, units, k_bits, v_bits, stream);
      case 256: return launch_bits<256, true>(args, plan, units, k_bits, v_bits, stream);
    }
    return TQ_CUDA_BAD_ARGUMENT;
  }
  switch (dim) {
    case 64: return launch_bits<64, false>(args, plan, units, k_bits, v_bits, stream);
    case 128: return launch_bits<128, false>(args, plan, units, k_bits, v_bits, stream);
    case 256: return launch_bits<256, false>(args, plan, units, k_bits, v_bits, stream);
  }
  return launch_raw(args, plan, units, static_cast<int>(kernel_dim(dim, k_bits, v_bits)), stream);
}

}  // namespace mma
}  // namespace tq_cuda
