// Shared ORT glue: the OrtCustomOp adapter built from the contract tables (plugins/common/tq_ops.h),
// attribute reading that refuses wrong types, input fetching with shape/type checks that name the
// offending input, a tq::Parallel over ONNX Runtime's intra-op thread pool, and (with CUDA) the
// compute stream and scratch memory of the CUDA EP.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "ort_api.h"
#include "tq_kernels.h"
#include "tq_ops.h"

#ifdef TQ_DEPLOY_ORT_CUDA
#include "tq_cuda.h"
#endif

namespace tq_ort {

constexpr const char* kCpuProvider = "CPUExecutionProvider";
constexpr const char* kCudaProvider = "CUDAExecutionProvider";

// Thrown by kernels for invalid inputs; turned into an ORT_INVALID_ARGUMENT status.
[[noreturn]] void fail(const std::string& op, const std::string& message);

std::string shape_str(const std::vector<int64_t>& shape);
const char* type_name(ONNXTensorElementDataType type);
ONNXTensorElementDataType element_type(tq_ops::Type type, ONNXTensorElementDataType float_type);

// Binds symbolic dimensions (D, N, B, ...) to the first input that shows them and reports
// any later input that disagrees, naming both. Symbols and input names are the contract's
// string literals (plugins/common/tq_ops.h), so a bind stores pointers and formats nothing
// unless it fails: it runs for every input of every Compute.
class DimTable {
 public:
  explicit DimTable(const char* op) : op_(op) {}
  // Records or checks `symbol` = shape[axis] of input `input`.
  int64_t bind(const char* symbol, int64_t value, const char* input, size_t axis);
  int64_t get(const char* symbol) const { return find(symbol)->value; }
  // "input.shape[axis]" of the input that bound `symbol`.
  std::string source(const char* symbol) const;

 private:
  struct Bound {
    const char* symbol;
    int64_t value;
    const char* input;
    size_t axis;
  };
  const Bound* find(const char* symbol) const;
  const char* op_;
  std::vector<Bound> dims_;
};

// A fetched input: its ORT value, shape and spec.
struct Input {
  Ort::ConstValue value;
  std::vector<int64_t> shape;
  const tq_ops::Tensor* spec;
  template <typename T>
  const T* data() const {
    return value.GetTensorData<T>();
  }
  const void* raw() const { return value.GetTensorRawData(); }
};

class KernelIo {
 public:
  KernelIo(OrtKernelContext* context, const tq_ops::Op& op, ONNXTensorElementDataType float_type);

  // Input `index` checked for its element type and, when given, its rank and symbolic dims
  // ("..." is not supported here; callers handle leading dims themselves).
  Input input(size_t index, std::initializer_list<const char*> dims = {});
  Ort::UnownedValue output(size_t index, const std::vector<int64_t>& shape);
  DimTable& dims() { return dims_; }
  const char* op() const { return op_.name; }
  const tq_ops::Op& op_spec() const { return op_; }
  tq::Parallel parallel() const;
  Ort::KernelContext& context() { return context_; }

 private:
  Ort::KernelContext context_;
  const tq_ops::Op& op_;
  ONNXTensorElementDataType float_type_;
  DimTable dims_;
};

// Checks a codebook input: rank 1 with 2**bits entries.
void check_codebook(KernelIo& io, const Input& codebook, int64_t bits, const char* bits_name);
// Checks a codebook's values (host memory: CPU kernels only): finite, strictly ascending.
void check_codebook_values(KernelIo& io, const Input& codebook);
// Checks the rotation input: square [D, D] with D bound in io.dims().
void check_rotation(KernelIo& io, const Input& rotation);

// The node's attributes, read once when the kernel is created and checked against the contract:
// a required one missing, one of the wrong type (an int `scale`, a float `bits`), a bit width
// outside 1..8 or a negative or non-finite scale fails the session creation, naming it.
class Attributes {
 public:
  Attributes(const OrtKernelInfo* info, const tq_ops::Op& op);
  int bits(int index) const { return static_cast<int>(values_[index]); }
  float real(int index) const { return static_cast<float>(values_[index]); }

 private:
  std::vector<double> values_;
};

tq::DType to_dtype(ONNXTensorElementDataType type);

// OrtCustomOp adapter: Kernel provides kOp (a tq_ops::Op table), kProvider, a constructor
// Kernel(const OrtKernelInfo*, ONNXTensorElementDataType float_type) that reads and checks
// attributes (throwing Ort::Exception), and Compute(OrtKernelContext*). The ops declare versions
// tq_ops::kDomainVersion..kDomainVersion, but ONNX Runtime registers a custom domain for opset
// versions 1..1000 with one schema per op name (since version = the first op's start version), so
// a model importing "turboquant" version 2 still gets these kernels, and no kernel API shows the
// model's opset version or a node's full attribute list: tq_deploy.runtime.session.check_custom_nodes
// refuses other versions and unknown attributes before a session is made (docs/reliability.md).
template <typename Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, Kernel, /*WithStatus=*/true> {
  explicit Op(ONNXTensorElementDataType float_type) : float_type_(float_type) {
    this->start_ver_ = tq_ops::kDomainVersion;
    this->end_ver_ = tq_ops::kDomainVersion;
  }

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

  const char* GetName() const { return Kernel::kOp.name; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return static_cast<size_t>(Kernel::kOp.num_inputs); }
  size_t GetOutputTypeCount() const { return static_cast<size_t>(Kernel::kOp.num_outputs); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return element_type(Kernel::kOp.inputs[i].type, float_type_); }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return element_type(Kernel::kOp.outputs[i].type, float_type_);
  }

 private:
  ONNXTensorElementDataType float_type_;
};

// Base for kernels: the float type the kernel was registered for and the node's attributes
// (read once, when ORT creates the kernel, against Derived::kOp); ComputeV2 converts exceptions
// into an OrtStatus.
template <typename Derived>
struct KernelBase {
  KernelBase(const OrtKernelInfo* info, ONNXTensorElementDataType float_type)
      : float_type_(float_type), attrs_(info, Derived::kOp) {}

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

  ONNXTensorElementDataType float_type_;
  Attributes attrs_;
};

#ifdef TQ_DEPLOY_ORT_CUDA
inline tq_cuda_dtype to_cuda_dtype(ONNXTensorElementDataType type) {
  return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? TQ_CUDA_FLOAT16 : TQ_CUDA_FLOAT32;
}

// What a CUDA EP kernel launches with: ORT's compute stream for this node, and scratch memory
// from ORT's allocator for that device (released when this object goes; the kernels that use it
// run on the same stream, so a later allocation of the same bytes is ordered after them).
class CudaLaunch {
 public:
  CudaLaunch(KernelIo& io, const Input& any_device_input);
  ~CudaLaunch();
  void* stream() const { return stream_; }
  void* scratch(size_t bytes);
  // Turns a launcher's return code into an ORT error naming the op (nothing was launched for
  // TQ_CUDA_BAD_ARGUMENT).
  void check(int rc, const char* what) const;

 private:
  const char* op_;
  void* stream_ = nullptr;
  OrtAllocator* allocator_ = nullptr;
  std::vector<void*> buffers_;
};
#endif

// The registration point: every op of the library, as OrtCustomOp objects that live for the
// whole process (one per provider and float type where the contract allows float and float16).
std::vector<const OrtCustomOp*> all_ops();

enum class Provider { kCpu, kCuda };
const OrtCustomOp* make_encode_op(Provider provider, ONNXTensorElementDataType float_type);
const OrtCustomOp* make_decode_op(Provider provider, ONNXTensorElementDataType float_type);
const OrtCustomOp* make_cache_update_op(Provider provider, ONNXTensorElementDataType float_type);
const OrtCustomOp* make_paged_attention_op(Provider provider, ONNXTensorElementDataType float_type);

}  // namespace tq_ort
