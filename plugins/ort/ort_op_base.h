// Shared ORT glue: a declarative op description (inputs/outputs named as in tq_deploy/ops.py),
// the OrtCustomOp adapter, input fetching with shape/type checks that name the offending input,
// and a tq::Parallel over ONNX Runtime's intra-op thread pool.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "ort_api.h"
#include "tq_kernels.h"

namespace tq_ort {

constexpr const char* kDomain = "turboquant";

// Stands for the op's float type parameter "T" (float or float16) in an IoSpec.
constexpr ONNXTensorElementDataType kTypeT = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

struct IoSpec {
  const char* name;
  ONNXTensorElementDataType type;  // kTypeT: the op instance's float type
};

// Thrown by kernels for invalid inputs; turned into an ORT_INVALID_ARGUMENT status.
[[noreturn]] void fail(const std::string& op, const std::string& message);

std::string shape_str(const std::vector<int64_t>& shape);
const char* type_name(ONNXTensorElementDataType type);

// Binds symbolic dimensions (D, N, B, ...) to the first input that shows them and reports
// any later input that disagrees, naming both.
class DimTable {
 public:
  explicit DimTable(std::string op) : op_(std::move(op)) {}
  // Records or checks `symbol` = shape[axis] of input `input`.
  int64_t bind(const std::string& symbol, int64_t value, const std::string& input, size_t axis);
  int64_t get(const std::string& symbol) const { return dims_.at(symbol).value; }
  const std::string& source(const std::string& symbol) const { return dims_.at(symbol).where; }

 private:
  struct Bound {
    int64_t value;
    std::string where;
  };
  std::string op_;
  std::map<std::string, Bound> dims_;
};

// A fetched input: its ORT value, shape and spec.
struct Input {
  Ort::ConstValue value;
  std::vector<int64_t> shape;
  const IoSpec* spec;
  template <typename T>
  const T* data() const {
    return value.GetTensorData<T>();
  }
};

class KernelIo {
 public:
  KernelIo(OrtKernelContext* context, std::string op, const std::vector<IoSpec>& inputs,
           ONNXTensorElementDataType float_type);

  // Input `index` checked for its element type and, when given, its rank and symbolic dims
  // ("..." is not supported here; callers handle leading dims themselves).
  Input input(size_t index, std::initializer_list<const char*> dims = {}, bool check_rank = true);
  Ort::UnownedValue output(size_t index, const std::vector<int64_t>& shape);
  DimTable& dims() { return dims_; }
  const std::string& op() const { return op_; }
  tq::Parallel parallel() const;
  Ort::KernelContext& context() { return context_; }

 private:
  Ort::KernelContext context_;
  std::string op_;
  const std::vector<IoSpec>& specs_;
  ONNXTensorElementDataType float_type_;
  DimTable dims_;
};

// Checks a codebook input: rank 1 with 2**bits entries.
void check_codebook(KernelIo& io, const Input& codebook, int64_t bits, const char* bits_name);
// Checks the rotation input: square [D, D] with D bound in io.dims().
void check_rotation(KernelIo& io, const Input& rotation);

int64_t required_int_attribute(const OrtKernelInfo* info, const char* op, const char* name);
// A bits attribute (required) checked against the supported widths; fails the op naming it.
int64_t checked_bits(const OrtKernelInfo* info, const char* op, const char* name);
float float_attribute(const OrtKernelInfo* info, const char* name, float fallback);

tq::DType to_dtype(ONNXTensorElementDataType type);

// OrtCustomOp adapter: Kernel provides kName, kInputs, kOutputs (IoSpec lists), a constructor
// Kernel(const OrtKernelInfo*, ONNXTensorElementDataType float_type) that reads and checks
// attributes (throwing Ort::Exception), and Compute(OrtKernelContext*).
template <typename Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, Kernel, /*WithStatus=*/true> {
  explicit Op(ONNXTensorElementDataType float_type) : float_type_(float_type) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info, float_type_);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, e.what());
    }
  }

  const char* GetName() const { return Kernel::kName; }
  size_t GetInputTypeCount() const { return Kernel::inputs().size(); }
  size_t GetOutputTypeCount() const { return Kernel::outputs().size(); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return resolve(Kernel::inputs()[i].type); }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return resolve(Kernel::outputs()[i].type); }

 private:
  ONNXTensorElementDataType resolve(ONNXTensorElementDataType t) const { return t == kTypeT ? float_type_ : t; }
  ONNXTensorElementDataType float_type_;
};

// Base for kernels: ComputeV2 converts exceptions into an OrtStatus.
template <typename Derived>
struct KernelBase {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      static_cast<Derived*>(this)->Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
};

// The registration point: every op of the library, as OrtCustomOp objects that live for the
// whole process (one per float type where the contract allows float and float16).
std::vector<const OrtCustomOp*> all_ops();

const OrtCustomOp* make_encode_op(ONNXTensorElementDataType float_type);
const OrtCustomOp* make_decode_op();
const OrtCustomOp* make_cache_update_op(ONNXTensorElementDataType float_type);
const OrtCustomOp* make_paged_attention_op(ONNXTensorElementDataType float_type);

}  // namespace tq_ort
