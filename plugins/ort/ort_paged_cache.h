// The paged cache as ORT inputs: the four tensors (codes and norms of keys and values), their
// shape checks against each other and the bit widths, and the in-place aliasing rule of
// TQCacheUpdate's outputs. Shared by the cache-update and attention ops of both providers.
#pragma once

#include "ort_op_base.h"

namespace tq_ort {

// k_codes, k_norms, v_codes, v_norms starting at input `first` (binding N, B, Hkv, Pk, Pv).
struct CacheInputs {
  Input k_codes, k_norms, v_codes, v_norms;
  CacheInputs(KernelIo& io, size_t first)
      : k_codes(io.input(first, {"N", "B", "Hkv", "Pk"})),
        k_norms(io.input(first + 1, {"N", "B", "Hkv"})),
        v_codes(io.input(first + 2, {"N", "B", "Hkv", "Pv"})),
        v_norms(io.input(first + 3, {"N", "B", "Hkv"})),
        first_(first) {}
  const Input& at(int i) const { return i == 0 ? k_codes : i == 1 ? k_norms : i == 2 ? v_codes : v_norms; }
  size_t first() const { return first_; }

 private:
  size_t first_;
};

// Packed sizes against D (bound) and the bit widths; B >= 1 and Hkv >= 1.
void check_cache(KernelIo& io, const CacheInputs& cache, int k_bits, int v_bits);

// The inputs the paged attention ops (decode and prefill) share: query [rows, Hq, D], the cache,
// block_tables [S, M] and context_lens [S] (the first seven inputs of both, in the contract's
// order; `rows` is S for the decode op, T for the prefill).
struct PagedInputs {
  Input query;
  CacheInputs cache;
  Input block_tables, context_lens;
  PagedInputs(KernelIo& io, const char* rows);
};

// What the paged attention ops check alike: the rotation and the codebooks (inputs `rotation`,
// `rotation` + 1, `rotation` + 2, fetched here, after the op's own inputs) against the bit widths,
// the cache, Hq a positive multiple of Hkv, and on the host the codebooks' values.
void check_paged_inputs(KernelIo& io, const PagedInputs& in, size_t rotation, int k_bits, int v_bits);

// The optional key mean of the paged attention ops: inputs `key_mean` [Hkv, D] and `key_mean` + 1
// (rope_inv_freq [D/2]), both or neither, fetched when present (else their call fields stay
// null); on the host also their values (finite).
void fetch_key_mean(KernelIo& io, size_t key_mean);

// Output `index` of TQCacheUpdate may share its own cache input's buffer (in place), and no other
// input's bytes: an output bound over another input (k_codes_out over v_codes, say) would corrupt
// it silently, so it is refused, naming both.
void refuse_foreign_alias(KernelIo& io, int index, const void* output, const CacheInputs& cache,
                          size_t first_cache_input);

}  // namespace tq_ort
