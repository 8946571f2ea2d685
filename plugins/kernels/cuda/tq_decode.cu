// TQDecode on the GPU: x_hat = norm * Pi^T c[code], one warp per vector (Pi read through L1).
// Decode is not on the serving path (attention never decompresses the cache), so this kernel
// favours plainness: lanes take output coordinates, the centroids sit in shared memory.
#include "tq_cuda_common.cuh"

namespace tq_cuda {
namespace {

constexpr int kDecodeWarps = 4;

__global__ void __launch_bounds__(kDecodeWarps * 32)
    decode_kernel(const uint8_t* codes, const float* norms, int64_t rows, int dim, const float* rotation,
                  const float* codebook, int bits, float* x_hat) {
  extern __shared__ float decode_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* centroids = decode_smem + warp * dim;
  const int64_t packed = (static_cast<int64_t>(dim) * bits + 7) / 8;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kDecodeWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kDecodeWarps) {
    const uint8_t* p = codes + row * packed;
    for (int i = lane; i < dim; i += 32) centroids[i] = __ldg(codebook + unpack_code(p, i, bits));
    __syncwarp();
    const float norm = norms[row];
    for (int j = lane; j < dim; j += 32) {
      float y = 0.f;
      for (int i = 0; i < dim; ++i) y = fmaf(centroids[i], __ldg(rotation + static_cast<int64_t>(i) * dim + j), y);
      x_hat[row * dim + j] = y * norm;
    }
    __syncwarp();
  }
}

}  // namespace
}  // namespace tq_cuda

using namespace tq_cuda;

extern "C" int tq_cuda_decode(const tq_decode_call* c) {
  if (c == nullptr || c->rows < 0 || c->head_dim < 1 || c->head_dim > 8192 || !valid_bits(c->bits))
    return TQ_CUDA_BAD_ARGUMENT;
  const int64_t rows = c->rows, dim = c->head_dim;
  if (rows == 0) return 0;
  const size_t shared = kDecodeWarps * static_cast<size_t>(dim) * sizeof(float);
  if (int rc = reserve_shared(decode_kernel, shared)) return rc;
  const int64_t blocks = (rows + kDecodeWarps - 1) / kDecodeWarps;
  const unsigned grid = static_cast<unsigned>(blocks < int64_t{num_sms()} * 16 ? blocks : int64_t{num_sms()} * 16);
  decode_kernel<<<grid, kDecodeWarps * 32, shared, static_cast<cudaStream_t>(c->stream)>>>(
      c->codes, c->norms, rows, static_cast<int>(dim), c->rotation, c->codebook, c->bits, c->x_hat);
  return launch_status();
}

extern "C" size_t tq_cuda_decode_workspace(const tq_decode_call*) { return 0; }
