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
#include "tq_op_list.h"
#include "tq_ops.h"

#ifdef TQ_DEPLOY_ORT_CUDA
#include "tq_cuda.h"
#include "tq_cuda_launcher.h"
#endif

namespace tq_ort {

constexpr const char* kCpuProvider = "CPUExecutionProvider";
constexpr const char* kCudaProvider = "CUDAExecutionProvider";

// Thrown by kernels for invalid inputs; turned into an ORT_INVALID_ARGUMENT status.
[[noreturn]] void fail(const std::string& op, const std::string& message);

std::string shape_str(const std::vector<int64_t>& shape);
const char* type_name(ONNXTensorElementDataType type);
// The element type of a contract type for a kernel of float type `float_type` (kT) and cache norm
// type `norm_type` (kN).
ONNXTensorElementDataType element_type(tq_ops::Type type, ONNXTensorElementDataType float_type,
                                       ONNXTensorElementDataType norm_type);

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

class Attributes;

// One Compute's view of the node: inputs fetched with their checks, outputs allocated, and the
// same node as tq_ops::<op>::fill reads it (in, out, dim, rows, int_attr, float_attr, dtype by
// the contract's enums), so every op fills its call struct by one generated function.
class KernelIo {
 public:
  KernelIo(OrtKernelContext* context, const tq_ops::Op& op, ONNXTensorElementDataType float_type,
           ONNXTensorElementDataType norm_type, const Attributes& attrs);

  // Input `index` checked for its element type and, when given, its rank and symbolic dims
  // ("..." is not supported here; callers handle leading dims themselves).
  Input input(size_t index, std::initializer_list<const char*> dims = {});
  // Whether the node has optional input `index` (an input past the node's count, or an empty
  // name, is left out).
  bool has_input(size_t index);
  Ort::UnownedValue output(size_t index, const std::vector<int64_t>& shape);
  DimTable& dims() { return dims_; }
  const char* op() const { return op_.name; }
  const tq_ops::Op& op_spec() const { return op_; }
  tq::Parallel parallel() const;
  Ort::KernelContext& context() { return context_; }
  // Host data (CPU provider) or device data (CUDA: the stream its copies and kernels go on).
  bool on_host() const { return stream_ == nullptr; }
  void* stream() const { return stream_; }
  void set_stream(void* stream) { stream_ = stream; }
  // Copies bytes between two buffers of the node's memory (host, or device on the stream).
  void copy(void* dst, const void* src, size_t bytes);

  // What tq_ops::<op>::fill reads (inputs and outputs fetched above, by index).
  const void* in(int index) const { return inputs_[index].data; }
  void* out(int index) const { return outputs_[index]; }
  int64_t dim(int index, int axis) const;
  int64_t rows(int index, int trailing) const;
  int64_t int_attr(int index) const;
  double float_attr(int index) const;
  int dtype() const;
  int norm_dtype() const;

 private:
  static constexpr int kMaxTensors = 16;
  struct Fetched {
    const void* data = nullptr;
    std::vector<int64_t> shape;
  };
  Ort::KernelContext context_;
  const tq_ops::Op& op_;
  ONNXTensorElementDataType float_type_;
  ONNXTensorElementDataType norm_type_;
  const Attributes& attrs_;
  DimTable dims_;
  void* stream_ = nullptr;
  Fetched inputs_[kMaxTensors];
  void* outputs_[kMaxTensors] = {};
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
  double value(int index) const { return values_[index]; }

 private:
  std::vector<double> values_;
};

enum class Provider { kCpu, kCuda };

#ifdef TQ_DEPLOY_ORT_CUDA
// What a CUDA EP kernel launches with: ORT's compute stream for this node, and scratch memory
// from ORT's allocator for the device of the node's first input (released when this object goes;
// the kernels that use it run on the same stream, so a later allocation of the same bytes is
// ordered after them).
class CudaLaunch {
 public:
  explicit CudaLaunch(KernelIo& io);
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

// The checks both providers run for one op (and, io.on_host(), the host-data checks), its
// outputs, and its call filled by tq_ops::<stem>::fill; false when there is nothing to compute.
// One overload per op of the contract, defined in plugins/ort/tq_<stem>_op.cc.
#define TQ_ORT_DECLARE_PREPARE(stem, Pascal, float_types, norm_types) bool prepare(KernelIo& io, tq_##stem##_call& call);
TQ_FOR_EACH_OP(TQ_ORT_DECLARE_PREPARE)
#undef TQ_ORT_DECLARE_PREPARE

// An op's ORT kernel on provider P: prepare(), then the CPU kernel tq::<stem> or the CUDA
// launcher tq_cuda_<stem> (through tq_cuda::Launcher, which keeps the paged attention's plan per
// shape) with the workspace from ORT's allocator. The node's attributes are read and checked
// once, when ORT creates the kernel.
template <typename Call, Provider P>
struct Kernel {
  static constexpr const tq_ops::Op& kOp = tq_ops::op_of(static_cast<const Call*>(nullptr));
  static constexpr const char* kProvider = P == Provider::kCpu ? kCpuProvider : kCudaProvider;

  Kernel(const OrtKernelInfo* info, ONNXTensorElementDataType float_type, ONNXTensorElementDataType norm_type)
      : float_type_(float_type), norm_type_(norm_type), attrs_(info, kOp) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }

  void Compute(OrtKernelContext* context) {
    KernelIo io(context, kOp, float_type_, norm_type_, attrs_);
    Call call{};
    if constexpr (P == Provider::kCpu) {
      if (prepare(io, call)) tq::run(call, io.parallel());
    } else {
#ifdef TQ_DEPLOY_ORT_CUDA
      CudaLaunch launch(io);
      io.set_stream(launch.stream());
      if (!prepare(io, call)) return;
      call.stream = launch.stream();
      call.workspace_bytes = launcher_.workspace(call);
      call.workspace = call.workspace_bytes ? launch.scratch(call.workspace_bytes) : nullptr;
      launch.check(launcher_.run(call), kOp.name);
#endif
    }
  }

  ONNXTensorElementDataType float_type_;
  ONNXTensorElementDataType norm_type_;
  Attributes attrs_;
#ifdef TQ_DEPLOY_ORT_CUDA
  tq_cuda::Launcher<Call> launcher_;
#endif
};

// Output <x>_out updates input <x> in place where the contract says so (tq_ops::Op::in_place).
template <typename Kernel>
size_t ORT_API_CALL may_inplace(int** input_index, int** output_index) {
  const tq_ops::Op& op = Kernel::kOp;
  *input_index = new int[op.num_in_place];
  *output_index = new int[op.num_in_place];
  for (int i = 0; i < op.num_in_place; ++i) {
    (*input_index)[i] = op.in_place[i].input;
    (*output_index)[i] = op.in_place[i].output;
  }
  return static_cast<size_t>(op.num_in_place);
}
void ORT_API_CALL release_may_inplace(int* input_index, int* output_index);

// OrtCustomOp adapter: Kernel provides kOp (a tq_ops::Op table), kProvider, a constructor
// Kernel(const OrtKernelInfo*, float_type, norm_type) that reads and checks
// attributes (throwing Ort::Exception), and Compute(OrtKernelContext*). The ops declare versions
// tq_ops::kDomainVersion..kDomainVersion, but ONNX Runtime registers a custom domain for opset
// versions 1..1000 with one schema per op name (since version = the first op's start version), so
// a model importing "turboquant" version 2 still gets these kernels, and no kernel API shows the
// model's opset version or a node's full attribute list: tq_deploy.runtime.session.check_custom_nodes
// refuses other versions and unknown attributes before a session is made (docs/reliability.md).
template <typename Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, Kernel, /*WithStatus=*/true> {
  Op(ONNXTensorElementDataType float_type, ONNXTensorElementDataType norm_type)
      : float_type_(float_type), norm_type_(norm_type) {
    this->start_ver_ = tq_ops::kDomainVersion;
    this->end_ver_ = tq_ops::kDomainVersion;
    if (Kernel::kOp.num_in_place > 0) {
      this->GetMayInplace = may_inplace<Kernel>;
      this->ReleaseMayInplace = release_may_inplace;
    }
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info, float_type_, norm_type_);
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
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return element_type(Kernel::kOp.inputs[i].type, float_type_, norm_type_);
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return Kernel::kOp.inputs[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return element_type(Kernel::kOp.outputs[i].type, float_type_, norm_type_);
  }

 private:
  ONNXTensorElementDataType float_type_;
  ONNXTensorElementDataType norm_type_;
};

// The kernels of an op on every provider this build has, as OrtCustomOp objects.
template <typename Call>
const OrtCustomOp* make_op(Provider provider, ONNXTensorElementDataType float_type,
                           ONNXTensorElementDataType norm_type) {
#ifdef TQ_DEPLOY_ORT_CUDA
  if (provider == Provider::kCuda) return new Op<Kernel<Call, Provider::kCuda>>(float_type, norm_type);
#endif
  return provider == Provider::kCpu ? new Op<Kernel<Call, Provider::kCpu>>(float_type, norm_type) : nullptr;
}

// The registration point: every op of the library, as OrtCustomOp objects that live for the
// whole process (one per provider, float type and cache norm type where the contract allows
// float32 and float16; ORT picks the one whose input types match the node).
std::vector<const OrtCustomOp*> all_ops();

}  // namespace tq_ort
