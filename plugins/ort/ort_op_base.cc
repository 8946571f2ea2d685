#include "ort_op_base.h"

#include <cmath>
#include <cstring>

#include "tq_checks.h"

#ifdef TQ_DEPLOY_ORT_CUDA
#include "tq_cuda.h"
#endif

namespace tq_ort {

void fail(const std::string& op, const std::string& message) {
  throw Ort::Exception(op + ": " + message, ORT_INVALID_ARGUMENT);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

const char* type_name(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "another type";
  }
}

ONNXTensorElementDataType element_type(tq_ops::Type type, ONNXTensorElementDataType float_type,
                                       ONNXTensorElementDataType norm_type) {
  switch (type) {
    case tq_ops::Type::kT: return float_type;
    case tq_ops::Type::kN: return norm_type;
    case tq_ops::Type::kFloat32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case tq_ops::Type::kUint8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case tq_ops::Type::kInt32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    case tq_ops::Type::kInt64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

namespace {
std::string where(const char* input, size_t axis) {
  return std::string(input) + ".shape[" + std::to_string(axis) + "]";
}
}  // namespace

const DimTable::Bound* DimTable::find(const char* symbol) const {
  for (const Bound& b : dims_)
    if (std::strcmp(b.symbol, symbol) == 0) return &b;
  fail(op_, std::string("internal: dimension ") + symbol + " was never bound");
}

std::string DimTable::source(const char* symbol) const {
  const Bound* b = find(symbol);
  return where(b->input, b->axis);
}

int64_t DimTable::bind(const char* symbol, int64_t value, const char* input, size_t axis) {
  for (const Bound& b : dims_) {
    if (std::strcmp(b.symbol, symbol) != 0) continue;
    if (b.value != value) {
      std::ostringstream msg;
      msg << "input " << input << " has " << where(input, axis) << "=" << value << " (" << symbol << "), expected "
          << symbol << "=" << b.value << " as in " << where(b.input, b.axis);
      fail(op_, msg.str());
    }
    return value;
  }
  dims_.push_back(Bound{symbol, value, input, axis});
  return value;
}

KernelIo::KernelIo(OrtKernelContext* context, const tq_ops::Op& op, ONNXTensorElementDataType float_type,
                   ONNXTensorElementDataType norm_type, const Attributes& attrs)
    : context_(context), op_(op), float_type_(float_type), norm_type_(norm_type), attrs_(attrs), dims_(op.name) {}

int64_t KernelIo::dim(int index, int axis) const {
  const std::vector<int64_t>& shape = inputs_[index].shape;
  return shape[axis < 0 ? shape.size() + axis : static_cast<size_t>(axis)];
}

int64_t KernelIo::rows(int index, int trailing) const {
  const std::vector<int64_t>& shape = inputs_[index].shape;
  int64_t n = 1;
  for (size_t i = 0; i + trailing < shape.size(); ++i) n *= shape[i];
  return n;
}

int64_t KernelIo::int_attr(int index) const { return static_cast<int64_t>(attrs_.value(index)); }
double KernelIo::float_attr(int index) const { return attrs_.value(index); }
int KernelIo::dtype() const { return float_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? TQ_FLOAT16 : TQ_FLOAT32; }
int KernelIo::norm_dtype() const {
  return norm_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? TQ_FLOAT16 : TQ_FLOAT32;
}

void KernelIo::copy(void* dst, const void* src, size_t bytes) {
  if (dst == src || bytes == 0) return;
  if (on_host()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef TQ_DEPLOY_ORT_CUDA
  const cudaError_t rc = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream_));
  if (rc != cudaSuccess)
    throw Ort::Exception(std::string(op_.name) + ": copying an input to its output failed: " + cudaGetErrorString(rc),
                         ORT_EP_FAIL);
#endif
}

bool KernelIo::has_input(size_t index) {
  return index < context_.GetInputCount() && context_.GetInput(index) != nullptr;
}

Input KernelIo::input(size_t index, std::initializer_list<const char*> dims) {
  const tq_ops::Tensor& spec = op_.inputs[index];
  Ort::ConstValue value = context_.GetInput(index);
  if (value == nullptr) fail(op_.name, std::string("input ") + spec.name + " is missing");
  auto info = value.GetTensorTypeAndShapeInfo();
  const ONNXTensorElementDataType expected = element_type(spec.type, float_type_, norm_type_);
  if (info.GetElementType() != expected) {
    fail(op_.name, std::string("input ") + spec.name + " has element type " + type_name(info.GetElementType()) +
                       ", expected " + type_name(expected));
  }
  Input in{value, info.GetShape(), &spec};
  inputs_[index] = Fetched{in.raw(), in.shape};
  if (dims.size() > 0) {
    if (in.shape.size() != dims.size()) {
      std::ostringstream msg;
      msg << "input " << spec.name << " has shape " << shape_str(in.shape) << " (rank " << in.shape.size()
          << "), expected rank " << dims.size() << " [";
      size_t i = 0;
      for (const char* d : dims) msg << (i++ ? ", " : "") << d;
      msg << "]";
      fail(op_.name, msg.str());
    }
    size_t axis = 0;
    for (const char* d : dims) {
      dims_.bind(d, in.shape[axis], spec.name, axis);
      ++axis;
    }
  }
  return in;
}

Ort::UnownedValue KernelIo::output(size_t index, const std::vector<int64_t>& shape) {
  Ort::UnownedValue value = context_.GetOutput(index, shape);
  outputs_[index] = value.GetTensorMutableRawData();
  return value;
}

namespace {
void run_on_ort_pool(void* runner, tq::Parallel::Task task, size_t total, void* task_ctx) {
  Ort::ThrowOnError(
      Ort::GetApi().KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(runner), task, total, 0, task_ctx));
}
}  // namespace

tq::Parallel KernelIo::parallel() const {
  tq::Parallel p;
  p.run = run_on_ort_pool;
  p.runner = context_.GetOrtKernelContext();
  return p;
}

void check_codebook(KernelIo& io, const Input& codebook, int64_t bits, const char* bits_name) {
  const int64_t expected = int64_t{1} << bits;
  if (codebook.shape.size() != 1 || codebook.shape[0] != expected) {
    std::ostringstream msg;
    msg << "input " << codebook.spec->name << " has shape " << shape_str(codebook.shape) << ", expected ["
        << expected << "] (2**" << bits_name << " centroids, " << bits_name << "=" << bits << ")";
    fail(io.op(), msg.str());
  }
}

void check_codebook_values(KernelIo& io, const Input& codebook) {
  const std::string problem = tq::check_codebook_values(codebook.spec->name, codebook.data<float>(), codebook.shape[0]);
  if (!problem.empty()) fail(io.op(), "input " + problem);
}

void check_rotation(KernelIo& io, const Input& rotation) {
  if (rotation.shape.size() != 2 || rotation.shape[0] != rotation.shape[1] || rotation.shape[0] < 1) {
    fail(io.op(), "input rotation has shape " + shape_str(rotation.shape) + ", expected a square [D, D] with D >= 1");
  }
  io.dims().bind("D", rotation.shape[0], "rotation", 0);
}

namespace {

enum class Found { kMissing, kPresent, kOtherType };

Found read_int(const OrtKernelInfo* info, const char* name, int64_t* value) {
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, value);
  if (status == nullptr) return Found::kPresent;
  Ort::GetApi().ReleaseStatus(status);
  float other = 0.f;
  status = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &other);
  if (status == nullptr) return Found::kOtherType;
  Ort::GetApi().ReleaseStatus(status);
  return Found::kMissing;
}

Found read_float(const OrtKernelInfo* info, const char* name, float* value) {
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_float(info, name, value);
  if (status == nullptr) return Found::kPresent;
  Ort::GetApi().ReleaseStatus(status);
  int64_t other = 0;
  status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &other);
  if (status == nullptr) return Found::kOtherType;
  Ort::GetApi().ReleaseStatus(status);
  return Found::kMissing;
}

}  // namespace

Attributes::Attributes(const OrtKernelInfo* info, const tq_ops::Op& op) {
  for (int i = 0; i < op.num_attrs; ++i) {
    const tq_ops::Attr& a = op.attrs[i];
    const bool is_int = a.kind == tq_ops::AttrKind::kInt;
    int64_t int_value = 0;
    float float_value = 0.f;
    const Found found = is_int ? read_int(info, a.name, &int_value) : read_float(info, a.name, &float_value);
    if (found == Found::kOtherType) {
      fail(op.name, std::string("attribute ") + a.name + " has type " + (is_int ? "float" : "int") + ", expected " +
                        (is_int ? "int" : "float") + " (see docs/ops.md)");
    }
    if (found == Found::kMissing) {
      if (a.required) fail(op.name, std::string("attribute ") + a.name + " (" + (is_int ? "int" : "float") + ") is required");
      values_.push_back(a.default_value);
      continue;
    }
    const double value = is_int ? static_cast<double>(int_value) : static_cast<double>(float_value);
    std::string problem;
    if (a.is_bits) {
      problem = tq::check_bits(a.name, int_value);
    } else if (!is_int && !(std::isfinite(value) && value >= a.min_value)) {
      std::ostringstream msg;
      msg << "attribute " << a.name << "=" << float_value << ", expected a finite number >= " << a.min_value;
      problem = msg.str();
    }
    if (!problem.empty()) fail(op.name, problem);
    values_.push_back(value);
  }
}

void ORT_API_CALL release_may_inplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

#ifdef TQ_DEPLOY_ORT_CUDA
CudaLaunch::CudaLaunch(KernelIo& io) : op_(io.op()) {
  stream_ = io.context().GetGPUComputeStream();
  const int device = io.context().GetInput(0).GetTensorMemoryInfo().GetDeviceId();
  Ort::MemoryInfo memory("Cuda", OrtDeviceAllocator, device, OrtMemTypeDefault);
  Ort::ThrowOnError(Ort::GetApi().KernelContext_GetAllocator(io.context().GetOrtKernelContext(), memory, &allocator_));
}

CudaLaunch::~CudaLaunch() {
  for (void* p : buffers_) allocator_->Free(allocator_, p);
  if (allocator_ != nullptr) Ort::GetApi().ReleaseAllocator(allocator_);
}

void* CudaLaunch::scratch(size_t bytes) {
  void* p = allocator_->Alloc(allocator_, bytes > 0 ? bytes : 1);
  if (p == nullptr) fail(op_, "the CUDA allocator returned no memory for " + std::to_string(bytes) + " bytes of scratch");
  buffers_.push_back(p);
  return p;
}

void CudaLaunch::check(int rc, const char* what) const {
  if (rc == 0) return;
  if (rc == TQ_CUDA_BAD_ARGUMENT) fail(op_, std::string(what) + " refused its arguments (a shape outside its limits)");
  throw Ort::Exception(std::string(op_) + ": " + what + " failed: " + tq_cuda_error_string(rc), ORT_EP_FAIL);
}
#endif

}  // namespace tq_ort
