// Shape helpers shared by the plugins' checks and output-shape expressions.
#pragma once

#include <initializer_list>
#include <string>

#include "tq_cuda.h"
#include "tq_plugin_base.h"

namespace tq_trt {

inline int64_t packed(int64_t dim, int bits) { return dim < 0 ? -1 : (dim * bits + 7) / 8; }

// The first non-empty problem of `checks` ("" when all are fine).
std::string first_problem(std::initializer_list<std::string> checks);

// The first known value among dims (-1 when all are unknown).
int64_t known(std::initializer_list<int64_t> dims);

std::string check_rotation_codebook(const nvinfer1::Dims& rotation, int64_t dim, const nvinfer1::Dims& codebook,
                                    const char* codebook_name, int bits);

// Checks a paged cache (codes [N, B, Hkv, P], norms [N, B, Hkv]) of `what` ("k" or "v").
std::string check_cache(const nvinfer1::Dims& codes, const nvinfer1::Dims& norms, const nvinfer1::Dims& ref_codes,
                        int64_t hkv, int64_t dim, int bits, const std::string& what);

// The checks the paged attention ops share: query [rows, Hq, D], the cache (codes, norms, codes,
// norms from `cache`), block_tables [S, M], context_lens [S], rotation, codebooks. With
// rows_are_seqs (decode: one row per sequence) S is query's rows, else block_tables' rows.
std::string check_paged_shapes(const nvinfer1::Dims& query, bool rows_are_seqs, const nvinfer1::Dims* cache,
                               const nvinfer1::Dims& tables, const nvinfer1::Dims& lens,
                               const nvinfer1::Dims& rotation, const nvinfer1::Dims& k_codebook,
                               const nvinfer1::Dims& v_codebook, int k_bits, int v_bits);

// The optional key mean of the paged attention ops (inputs key_mean [Hkv, D] and key_mean + 1,
// rope_inv_freq [D/2], both or neither; nb_inputs <= key_mean: the node has none).
std::string check_key_mean_shapes(const nvinfer1::Dims* in, int32_t nb_inputs, int32_t key_mean,
                                  const nvinfer1::Dims& query, const nvinfer1::Dims& k_codes);

// out = query where query has rank 3 (the attention ops' output); false otherwise.
bool like_query(const nvinfer1::DimsExprs& query, nvinfer1::DimsExprs& out);

// codes-like dims: leading dims of `src` then `last`.
void leading_then(const nvinfer1::DimsExprs& src, const nvinfer1::IDimensionExpr* last, nvinfer1::DimsExprs& out);
void leading_only(const nvinfer1::DimsExprs& src, nvinfer1::DimsExprs& out);

}  // namespace tq_trt
