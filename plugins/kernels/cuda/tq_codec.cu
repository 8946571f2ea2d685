// TQEncode, TQDecode and TQCacheUpdate on the GPU: one CTA per vector (correctness first; the
// fast kernels live in tq_deploy.triton).
#include "tq_cuda_common.cuh"

namespace tq_cuda {
namespace {

constexpr int64_t kMaxGrid = 1 << 30;

size_t encode_shared_bytes(int64_t dim) {
  // xs[dim] floats + bounds[15] + red[kWarps], then codes[dim] bytes
  return (static_cast<size_t>(dim) + kMaxCodebook + kWarps) * sizeof(float) + static_cast<size_t>(dim);
}

template <typename T>
__global__ void encode_kernel(const T* __restrict__ x, int64_t rows, int64_t dim, const float* __restrict__ rotation,
                              const float* __restrict__ codebook, int bits, uint8_t* __restrict__ codes,
                              float* __restrict__ norms) {
  extern __shared__ float smem[];
  float* xs = smem;
  float* bounds = xs + dim;
  float* red = bounds + kMaxCodebook;
  uint8_t* code_buf = reinterpret_cast<uint8_t*>(red + kWarps);
  load_boundaries(codebook, bits, bounds);
  __syncthreads();
  const int64_t packed = (dim * bits + 7) / 8;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x)
    encode_vector(x + row * dim, dim, rotation, bounds, bits, xs, code_buf, red, codes + row * packed, norms + row);
}

__global__ void decode_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ norms, int64_t rows,
                              int64_t dim, const float* __restrict__ rotation, const float* __restrict__ codebook,
                              int bits, float* __restrict__ x_hat) {
  extern __shared__ float cs[];  // c[code_i] of the current vector
  const int64_t packed = (dim * bits + 7) / 8;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const uint8_t* src = codes + row * packed;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) cs[i] = codebook[unpack_code(src, i, bits)];
    __syncthreads();
    const float norm = norms[row];
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      float acc = 0.f;  // (c @ Pi)_j: coalesced over j
      for (int64_t i = 0; i < dim; ++i) acc = fmaf(cs[i], rotation[i * dim + j], acc);
      x_hat[row * dim + j] = norm * acc;
    }
    __syncthreads();
  }
}

// grid: (tokens, Hkv, 2); blockIdx.z == 0 encodes the key, 1 the value.
template <typename T>
__global__ void cache_update_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                    const int64_t* __restrict__ slot_mapping, int64_t num_tokens, int64_t hkv,
                                    int64_t dim, uint8_t* k_codes, float* k_norms, uint8_t* v_codes, float* v_norms,
                                    int64_t num_slots, const float* __restrict__ rotation,
                                    const float* __restrict__ k_codebook, const float* __restrict__ v_codebook,
                                    int k_bits, int v_bits) {
  extern __shared__ float smem[];
  float* xs = smem;
  float* bounds = xs + dim;
  float* red = bounds + kMaxCodebook;
  uint8_t* code_buf = reinterpret_cast<uint8_t*>(red + kWarps);
  const bool is_value = blockIdx.z == 1;
  const int bits = is_value ? v_bits : k_bits;
  load_boundaries(is_value ? v_codebook : k_codebook, bits, bounds);
  __syncthreads();
  const int64_t h = blockIdx.y;
  const int64_t packed = (dim * bits + 7) / 8;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0 || slot >= num_slots) continue;  // uniform over the CTA
    // When a later token names the same slot, that token's write must win: skip this one.
    int overwritten = 0;
    for (int64_t u = t + 1 + threadIdx.x; u < num_tokens; u += blockDim.x) overwritten |= slot_mapping[u] == slot;
    if (__syncthreads_or(overwritten)) continue;
    const T* src = (is_value ? value : key) + (t * hkv + h) * dim;
    const int64_t dst = slot * hkv + h;
    uint8_t* out_codes = (is_value ? v_codes : k_codes) + dst * packed;
    float* out_norm = (is_value ? v_norms : k_norms) + dst;
    encode_vector(src, dim, rotation, bounds, bits, xs, code_buf, red, out_codes, out_norm);
  }
}

unsigned grid_of(int64_t n) { return static_cast<unsigned>(n < kMaxGrid ? n : kMaxGrid); }

}  // namespace
}  // namespace tq_cuda

using namespace tq_cuda;

extern "C" int tq_cuda_encode(const void* x, tq_cuda_dtype x_type, int64_t rows, int64_t dim, const float* rotation,
                              const float* codebook, int bits, uint8_t* codes, float* norms, cudaStream_t stream) {
  if (rows < 0 || dim < 1 || !valid_bits(bits)) return TQ_CUDA_BAD_ARGUMENT;
  if (rows == 0) return 0;
  const size_t shared = encode_shared_bytes(dim);
  if (x_type == TQ_CUDA_FLOAT16) {
    if (int rc = reserve_shared(encode_kernel<__half>, shared)) return rc;
    encode_kernel<__half><<<grid_of(rows), kThreads, shared, stream>>>(static_cast<const __half*>(x), rows, dim,
                                                                        rotation, codebook, bits, codes, norms);
  } else if (x_type == TQ_CUDA_FLOAT32) {
    if (int rc = reserve_shared(encode_kernel<float>, shared)) return rc;
    encode_kernel<float><<<grid_of(rows), kThreads, shared, stream>>>(static_cast<const float*>(x), rows, dim,
                                                                       rotation, codebook, bits, codes, norms);
  } else {
    return TQ_CUDA_BAD_ARGUMENT;
  }
  return launch_status();
}

extern "C" int tq_cuda_decode(const uint8_t* codes, const float* norms, int64_t rows, int64_t dim,
                              const float* rotation, const float* codebook, int bits, float* x_hat,
                              cudaStream_t stream) {
  if (rows < 0 || dim < 1 || !valid_bits(bits)) return TQ_CUDA_BAD_ARGUMENT;
  if (rows == 0) return 0;
  const size_t shared = static_cast<size_t>(dim) * sizeof(float);
  if (int rc = reserve_shared(decode_kernel, shared)) return rc;
  decode_kernel<<<grid_of(rows), kThreads, shared, stream>>>(codes, norms, rows, dim, rotation, codebook, bits, x_hat);
  return launch_status();
}

extern "C" int tq_cuda_cache_update(const void* key, const void* value, tq_cuda_dtype kv_type,
                                    const int64_t* slot_mapping, int64_t num_tokens, int64_t num_kv_heads,
                                    int64_t head_dim, uint8_t* k_codes, float* k_norms, uint8_t* v_codes,
                                    float* v_norms, int64_t num_blocks, int64_t block_size, const float* rotation,
                                    const float* k_codebook, const float* v_codebook, int k_bits, int v_bits,
                                    cudaStream_t stream) {
  if (num_tokens < 0 || num_kv_heads < 1 || num_kv_heads > 65535 || head_dim < 1 || num_blocks < 0 ||
      block_size < 1 || !valid_bits(k_bits) || !valid_bits(v_bits))
    return TQ_CUDA_BAD_ARGUMENT;
  if (num_tokens == 0 || num_blocks == 0) return 0;
  const size_t shared = encode_shared_bytes(head_dim);
  const dim3 grid(grid_of(num_tokens), static_cast<unsigned>(num_kv_heads), 2);
  const int64_t num_slots = num_blocks * block_size;
  if (kv_type == TQ_CUDA_FLOAT16) {
    if (int rc = reserve_shared(cache_update_kernel<__half>, shared)) return rc;
    cache_update_kernel<__half><<<grid, kThreads, shared, stream>>>(
        static_cast<const __half*>(key), static_cast<const __half*>(value), slot_mapping, num_tokens, num_kv_heads,
        head_dim, k_codes, k_norms, v_codes, v_norms, num_slots, rotation, k_codebook, v_codebook, k_bits, v_bits);
  } else if (kv_type == TQ_CUDA_FLOAT32) {
    if (int rc = reserve_shared(cache_update_kernel<float>, shared)) return rc;
    cache_update_kernel<float><<<grid, kThreads, shared, stream>>>(
        static_cast<const float*>(key), static_cast<const float*>(value), slot_mapping, num_tokens, num_kv_heads,
        head_dim, k_codes, k_norms, v_codes, v_norms, num_slots, rotation, k_codebook, v_codebook, k_bits, v_bits);
  } else {
    return TQ_CUDA_BAD_ARGUMENT;
  }
  return launch_status();
}
