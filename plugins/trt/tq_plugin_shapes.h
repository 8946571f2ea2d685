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

tq_cuda_dtype float_type(nvinfer1::DataType t);

// codes-like dims: leading dims of `src` then `last`.
void leading_then(const nvinfer1::DimsExprs& src, const nvinfer1::IDimensionExpr* last, nvinfer1::DimsExprs& out);
void leading_only(const nvinfer1::DimsExprs& src, nvinfer1::DimsExprs& out);

}  // namespace tq_trt
