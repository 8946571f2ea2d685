// Internal: scalar quantization to codes, bit packing, and unpacking straight to centroids.
// Packed layout: a little-endian bit stream, code i at bits [i*bits, (i+1)*bits) counting from
// bit 0 of byte 0; 8 codes of b bits fill exactly b bytes (codes may straddle two bytes when b is
// 3, 5, 6 or 7).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tq_kernels.h"
#include "tq_simd.h"

namespace tq {
namespace detail {

// ||x * 2^-e||_2, 2^e the binade of max |x| (e = 0 for a zero or non-finite maximum); `x` is
// overwritten with x * 2^-e. The power-of-two scaling is exact, so ldexp(result, e) is the plain
// float32 norm wherever that neither overflows nor underflows, and stays finite and accurate for
// vectors of 1e20s or 1e-30s.
TQ_INLINE float scaled_norm(float* x, int64_t d, int* exponent) {
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
  int e = 0;
  if (amax > 0.f && std::isfinite(amax)) std::frexp(amax, &e);
  const float s = std::ldexp(1.f, -e);
  for (int64_t i = 0; i < d; ++i) x[i] *= s;
  *exponent = e;
  return std::sqrt(dot(x, x, d));
}

// u = x / ||x|| in place (zero vectors stay zero: no NaN from 0/0); returns ||x||. The norm is
// computed scaled (scaled_norm), and u from the scaled x: the same bits as x / ||x||
// wherever ||x|| is a normal float32, and the right unit vector where it would over- or underflow.
TQ_INLINE float normalize(float* x, int64_t d) {
  int e = 0;
  const float scaled = scaled_norm(x, d, &e);
  if (scaled > 0.f) {
    for (int64_t i = 0; i < d; ++i) x[i] /= scaled;
  } else {
    std::fill(x, x + d, 0.f);  // a zero vector (or a NaN one, whose NaN norm says so)
  }
  return std::ldexp(scaled, e);
}

// Nearest centroid = number of midpoints strictly below the value (ties take the lower code).
struct Quantizer {
  int bits;
  int64_t dim;
  int64_t packed;
  std::vector<float> boundaries;  // 2**bits - 1 ascending midpoints (c_k + c_{k+1}) / 2

  Quantizer(const float* codebook, int bits_, int64_t dim_)
      : bits(bits_), dim(dim_), packed(packed_size(dim_, bits_)) {
    const int k = 1 << bits;
    boundaries.resize(k - 1);
    for (int i = 0; i + 1 < k; ++i) boundaries[i] = (codebook[i + 1] + codebook[i]) * 0.5f;
  }

  TQ_INLINE uint32_t code_of(float y) const {
    if (bits <= 4) {  // up to 15 boundaries: a branch-free count
      uint32_t code = 0;
      for (float b : boundaries) code += static_cast<uint32_t>(b < y);
      return code;
    }
    // lower_bound = the first boundary >= y = the count of boundaries < y (NaN counts none)
    return static_cast<uint32_t>(std::lower_bound(boundaries.begin(), boundaries.end(), y) - boundaries.begin());
  }

  TQ_INLINE void pack(const float* y, uint8_t* out) const {
    std::memset(out, 0, static_cast<size_t>(packed));
    for (int64_t i = 0; i < dim; ++i) {
      const int64_t bit = i * bits;
      const uint32_t v = code_of(y[i]) << (bit & 7);
      out[bit >> 3] |= static_cast<uint8_t>(v & 0xffu);
      if ((bit & 7) + bits > 8) out[(bit >> 3) + 1] |= static_cast<uint8_t>(v >> 8);
    }
  }
};

// Packed bytes -> centroid values. For 1, 2, 4 and 8 bits a byte holds 8/bits whole codes, so a
// 256-entry table of centroid tuples turns each byte into floats with one copy; 3, 5, 6 and
// 7-bit codes are decoded 8 at a time from groups of `bits` bytes.
struct Dequantizer {
  int bits;
  int64_t dim;
  int64_t packed;
  int per_byte;  // 0 for the grouped widths
  const float* codebook;
  std::vector<float> byte_table;  // [256][per_byte]

  Dequantizer(const float* codebook_, int bits_, int64_t dim_)
      : bits(bits_), dim(dim_), packed(packed_size(dim_, bits_)), per_byte(8 % bits_ == 0 ? 8 / bits_ : 0),
        codebook(codebook_) {
    if (per_byte) {
      byte_table.resize(256 * static_cast<size_t>(per_byte));
      const unsigned mask = (1u << bits) - 1u;
      for (unsigned b = 0; b < 256; ++b) {
        for (int k = 0; k < per_byte; ++k) byte_table[b * per_byte + k] = codebook[(b >> (k * bits)) & mask];
      }
    }
  }

  // Floats unpack() writes: dim rounded up to whole bytes (1/2/4/8 bits) or whole groups.
  int64_t padded_dim() const { return per_byte ? packed * per_byte : (packed + bits - 1) / bits * 8; }

  TQ_INLINE void unpack(const uint8_t* p, float* out) const {
    if (!per_byte) {
      const uint64_t mask = (uint64_t{1} << bits) - 1u;
      for (int64_t at = 0; at < packed; at += bits, p += bits, out += 8) {
        const int64_t n = std::min<int64_t>(bits, packed - at);
        uint64_t w = 0;
        for (int64_t b = 0; b < n; ++b) w |= static_cast<uint64_t>(p[b]) << (8 * b);
        for (int k = 0; k < 8; ++k) out[k] = codebook[(w >> (bits * k)) & mask];
      }
      return;
    }
    const float* table = byte_table.data();
    if (per_byte == 2) {  // 4 bits: the common case, one 8-byte copy per byte
      for (int64_t i = 0; i < packed; ++i) std::memcpy(out + 2 * i, table + 2 * p[i], 2 * sizeof(float));
      return;
    }
    const size_t step = static_cast<size_t>(per_byte);
    for (int64_t i = 0; i < packed; ++i) std::memcpy(out + i * step, table + p[i] * step, step * sizeof(float));
  }

  // Code i of a packed vector, read bit by bit (tails and the portable paths).
  TQ_INLINE unsigned code_at(const uint8_t* p, int64_t i) const {
    const int64_t bit = i * bits;
    const int shift = static_cast<int>(bit & 7);
    unsigned v = p[bit >> 3] >> shift;
    if (shift + bits > 8) v |= static_cast<unsigned>(p[(bit >> 3) + 1]) << (8 - shift);
    return v & ((1u << bits) - 1u);
  }
};

#if defined(__GNUC__) && !defined(__clang__)
#define TQ_HAVE_VECTOR_UNPACK 1
typedef uint32_t U8 __attribute__((vector_size(32)));

// Vector unpacking for up to 4 bits: 8 codes of BITS bits fill exactly BITS bytes, so a group is
// one small little-endian word w with code k = (w >> (BITS * k)) & mask; the centroids come from
// a variable lane permutation of the (zero-padded) 16-entry codebook held in two registers
// (vpermps on AVX2). Only worth it where the permutation is one instruction: callers use it in
// their AVX2 code path. Wider codes take the Dequantizer's tables.
struct VectorUnpacker {
  const Dequantizer* dq;
  F8 cb_lo, cb_hi;

  explicit VectorUnpacker(const Dequantizer& d) : dq(&d) {
    float padded[16] = {};
    for (int i = 0; i < (1 << std::min(d.bits, 4)); ++i) padded[i] = d.codebook[i];
    cb_lo = f8_load(padded);
    cb_hi = f8_load(padded + 8);
  }

  template <int BITS>
  TQ_INLINE void groups(const uint8_t* p, float* out, int64_t count) const {
    const U8 shifts = {0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS};
    const U8 mask = U8{} + ((1u << BITS) - 1u);
    for (int64_t g = 0; g < count; ++g, p += BITS, out += 8) {
      uint32_t w = 0;
      for (int b = 0; b < BITS; ++b) w |= static_cast<uint32_t>(p[b]) << (8 * b);
      const U8 idx = ((U8{} + w) >> shifts) & mask;
      if constexpr (BITS == 4) {
        f8_store(out, __builtin_shuffle(cb_lo, cb_hi, idx));
      } else {
        f8_store(out, __builtin_shuffle(cb_lo, idx));
      }
    }
  }

  // Writes dim floats (no padding beyond dim) for up to 4 bits; the padded row of
  // Dequantizer::unpack for wider codes.
  TQ_INLINE void unpack(const uint8_t* p, float* out) const {
    if (dq->bits > 4) {
      dq->unpack(p, out);
      return;
    }
    const int64_t full = dq->dim / 8;
    switch (dq->bits) {
      case 1: groups<1>(p, out, full); break;
      case 2: groups<2>(p, out, full); break;
      case 3: groups<3>(p, out, full); break;
      default: groups<4>(p, out, full); break;
    }
    for (int64_t i = full * 8; i < dq->dim; ++i) out[i] = dq->codebook[dq->code_at(p, i)];
  }
};
#endif

}  // namespace detail
}  // namespace tq
