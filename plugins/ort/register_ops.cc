// The library's single entry point: onnxruntime calls RegisterCustomOps when a session is
// created with SessionOptions.register_custom_ops_library(path). The op table is expanded from the
// contract's op list (tq_op_list.h, generated from tq_deploy/ops.py), once per provider; ORT picks
// the kernel by the node's provider.
#include <mutex>

#include "ort_op_base.h"
#include "tq_op_list.h"

#define TQ_STRINGIFY_(x) #x
#define TQ_STRINGIFY(x) TQ_STRINGIFY_(x)

namespace tq_ort {

namespace {

using Factory = const OrtCustomOp* (*)(Provider, ONNXTensorElementDataType, ONNXTensorElementDataType);
constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;

struct Entry {
  Factory make;
  ONNXTensorElementDataType float_type;
  ONNXTensorElementDataType norm_type;
};

// One kernel per float type (T) and cache norm type (TN) an op has: float32 and float16 each, so
// the paged ops get four; an op without a parameter (TQDecode has no T, only the cache ops have
// TN) float32 there.
#define TQ_ORT_ENTRY_1_1(stem) {make_op<tq_##stem##_call>, kF32, kF32},
#define TQ_ORT_ENTRY_2_1(stem) {make_op<tq_##stem##_call>, kF32, kF32}, {make_op<tq_##stem##_call>, kF16, kF32},
#define TQ_ORT_ENTRY_2_2(stem) \
  TQ_ORT_ENTRY_2_1(stem) {make_op<tq_##stem##_call>, kF32, kF16}, {make_op<tq_##stem##_call>, kF16, kF16},
#define TQ_ORT_ENTRY_(stem, float_types, norm_types) TQ_ORT_ENTRY_##float_types##_##norm_types(stem)
#define TQ_ORT_ENTRY(stem, Pascal, float_types, norm_types) TQ_ORT_ENTRY_(stem, float_types, norm_types)
constexpr Entry kOps[] = {TQ_FOR_EACH_OP(TQ_ORT_ENTRY)};
#undef TQ_ORT_ENTRY
#undef TQ_ORT_ENTRY_
#undef TQ_ORT_ENTRY_2_2
#undef TQ_ORT_ENTRY_2_1
#undef TQ_ORT_ENTRY_1_1

#ifdef TQ_DEPLOY_ORT_CUDA
constexpr Provider kProviders[] = {Provider::kCpu, Provider::kCuda};
#else
constexpr Provider kProviders[] = {Provider::kCpu};
#endif

}  // namespace

std::vector<const OrtCustomOp*> all_ops() {
  // Created once and never freed: sessions keep pointers to them for the process lifetime.
  static const std::vector<const OrtCustomOp*> ops = [] {
    std::vector<const OrtCustomOp*> v;
    for (Provider provider : kProviders)
      for (const Entry& e : kOps)
        if (const OrtCustomOp* op = e.make(provider, e.float_type, e.norm_type)) v.push_back(op);
    return v;
  }();
  return ops;
}

}  // namespace tq_ort

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Too old a runtime for the headers we were built against; version 1 of the API always
    // exists and is enough to report that.
    const OrtApi* v1 = api_base->GetApi(1);
    std::string msg = std::string("tq_deploy ORT library: onnxruntime ") + api_base->GetVersionString() +
                      " does not provide ORT API version " + std::to_string(ORT_API_VERSION) +
                      " that this library was built against; upgrade onnxruntime or rebuild the library with "
                      "headers of your onnxruntime (ORT_INCLUDE_DIR)";
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);

  // Each session options object gets its own domain object; all of them share the static ops
  // and must outlive every session, so they are kept until the process exits.
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;
  try {
    Ort::CustomOpDomain domain(tq_ops::kDomain);
    for (const OrtCustomOp* op : tq_ort::all_ops()) domain.Add(op);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// What this build registers, as JSON (tq-deploy info and tq_deploy.runtime.session read it).
extern "C" ORT_EXPORT const char* TQDeployOrtBuildInfo() {
#ifdef TQ_DEPLOY_ORT_CUDA
  return "{\"providers\": [\"cpu\", \"cuda\"], \"ort_api_version\": " TQ_STRINGIFY(ORT_API_VERSION) "}";
#else
  return "{\"providers\": [\"cpu\"], \"ort_api_version\": " TQ_STRINGIFY(ORT_API_VERSION) "}";
#endif
}
